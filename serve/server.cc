#include "serve/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <filesystem>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "loader/generation_config.h"
#include "loader/json_input.h"
#include "loader/tokenizer.h"
#include "loader/open_model.h"
#include "plans/cache_policy.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "serve/chat_template.h"
#include "serve/scheduler.h"

namespace kvplan {
namespace {

using nlohmann::json;

constexpr size_t kMaxBodyBytes = size_t(16) << 20;
constexpr int kMaxStopStrings = 16;
constexpr double kMaxTemperature = 2.0;  // OpenAI's range: 0 to 2
// How often a streaming handler looks at its client while no token comes, so a client that left is noticed.
constexpr std::chrono::milliseconds kPollInterval(50);

// An error as the client sees it: an HTTP status and OpenAI's error object.
struct HttpError {
  int status = 500;
  std::string code;
  std::string message;
  std::string param;  // the request field at fault, if one is
};

std::string ErrorType(int status) {
  if (status == 503) return "overloaded_error";
  return status < 500 ? "invalid_request_error" : "server_error";
}

// Invalid UTF-8 (a token may end inside a character) is replaced rather than thrown on.
std::string Dump(const json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); }

json ErrorObject(const HttpError& error) {
  return {{"error",
           {{"message", error.message},
            {"type", ErrorType(error.status)},
            {"param", error.param.empty() ? json() : json(error.param)},
            {"code", error.code}}}};
}

void Reply(httplib::Response& response, const HttpError& error) {
  response.status = error.status;
  response.set_content(Dump(ErrorObject(error)), "application/json");
}

HttpError FromStatus(const absl::Status& status, const std::string& code) {
  int http = 500;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: http = 400; break;
    case absl::StatusCode::kNotFound: http = 404; break;
    case absl::StatusCode::kResourceExhausted: http = 413; break;
    case absl::StatusCode::kUnavailable: http = 503; break;
    default: break;
  }
  return {.status = http, .code = code, .message = std::string(status.message())};
}

// What the request asks for, in the scheduler's terms.
struct CompletionRequest {
  bool chat = false;
  bool stream = false;
  std::string prompt_text;            // completions
  std::vector<ChatMessage> messages;  // chat
  std::optional<int> max_tokens;
  SamplingSettings sampling;
  std::vector<std::string> stops;
};

absl::StatusOr<double> Number(const json& body, const char* field) {
  if (!body[field].is_number()) return absl::InvalidArgumentError(absl::StrCat(field, " must be a number"));
  return body[field].get<double>();
}

template <typename T>
absl::StatusOr<T> Integer(const json& body, const char* field) {
  const std::optional<T> value = JsonInteger<T>(body[field]);
  if (!value) return absl::InvalidArgumentError(absl::StrCat(field, " must be an integer in range"));
  return *value;
}

bool Present(const json& body, const char* field) { return body.contains(field) && !body[field].is_null(); }

// The text of a chat message's content: a string, or a list of parts of which the text parts count.
absl::StatusOr<std::string> MessageContent(const json& content) {
  if (content.is_null()) return std::string();
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) return absl::InvalidArgumentError("a message's content must be a string or a list of parts");
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
        !part["text"].is_string())
      return absl::InvalidArgumentError("only text parts ({\"type\": \"text\", \"text\": ...}) are supported");
    text += part["text"].get<std::string>();
  }
  return text;
}

// OpenAI fields the server does not implement, each with the values that ask for nothing (so clients that send the
// defaults are served); any other value is refused naming the field, never silently ignored.
bool AsksForNothing(const std::string& field, const json& value) {
  if (value.is_null()) return true;
  if (field == "echo") return value == false;
  if (field == "best_of") return value == 1;
  if (field == "suffix") return value == "";
  if (field == "presence_penalty" || field == "frequency_penalty") return value.is_number() && value == 0;
  if (field == "logit_bias") return value.is_object() && value.empty();
  if (field == "tools" || field == "functions") return value.is_array() && value.empty();
  if (field == "tool_choice" || field == "function_call") return value == "none";
  if (field == "response_format") return value.is_object() && value.size() == 1 && value.value("type", json()) == "text";
  if (field == "stream_options")
    return value.is_object() && (!value.contains("include_usage") || value["include_usage"] == false);
  return false;
}

absl::Status RefuseUnsupportedFields(const json& body, std::string& param) {
  for (const char* field : {"echo", "best_of", "suffix", "presence_penalty", "frequency_penalty", "logit_bias", "tools",
                            "functions", "tool_choice", "function_call", "response_format", "stream_options"}) {
    if (!body.contains(field) || AsksForNothing(field, body[field])) continue;
    param = field;
    return absl::InvalidArgumentError(
        std::string(field) == "stream_options"
            ? "stream_options.include_usage is not supported (the final response of a request counts its tokens)"
            : absl::StrCat(field, " is not supported by this server"));
  }
  return absl::OkStatus();
}

// Checks field types and values; `param` names the field at fault.
absl::StatusOr<CompletionRequest> ParseCompletionRequest(const json& body, bool chat, std::string& param) {
  if (!body.is_object()) return absl::InvalidArgumentError("the request body must be a JSON object");
  KVPLAN_RETURN_IF_ERROR(RefuseUnsupportedFields(body, param));
  CompletionRequest request{.chat = chat};
  if (chat) {
    param = "messages";
    if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty())
      return absl::InvalidArgumentError("messages must be a non-empty list");
    for (const json& message : body["messages"]) {
      if (!message.is_object() || !message.contains("role") || !message["role"].is_string())
        return absl::InvalidArgumentError("every message must be an object with a string role");
      KVPLAN_ASSIGN_OR_RETURN(std::string content, MessageContent(message.value("content", json())));
      request.messages.push_back({message["role"].get<std::string>(), std::move(content)});
    }
  } else {
    param = "prompt";
    const json prompt = body.value("prompt", json());
    if (prompt.is_string()) {
      request.prompt_text = prompt.get<std::string>();
    } else if (prompt.is_array() && prompt.size() == 1 && prompt[0].is_string()) {
      request.prompt_text = prompt[0].get<std::string>();
    } else {
      return absl::InvalidArgumentError("prompt must be a string (or a list of one string)");
    }
  }
  for (const char* field : {"max_tokens", "max_completion_tokens"}) {
    if (!Present(body, field)) continue;
    param = field;
    KVPLAN_ASSIGN_OR_RETURN(request.max_tokens, Integer<int>(body, field));
    if (*request.max_tokens <= 0) return absl::InvalidArgumentError(absl::StrCat(field, " must be positive"));
  }
  if (Present(body, "temperature")) {
    param = "temperature";
    KVPLAN_ASSIGN_OR_RETURN(const double temperature, Number(body, "temperature"));
    if (!(temperature >= 0 && temperature <= kMaxTemperature))
      return absl::InvalidArgumentError(
          absl::StrCat("temperature must lie in [0, ", kMaxTemperature, "] (0: greedy), got ", temperature));
    request.sampling.temperature = float(temperature);
  }
  if (Present(body, "top_p")) {
    param = "top_p";
    KVPLAN_ASSIGN_OR_RETURN(const double top_p, Number(body, "top_p"));
    request.sampling.top_p = float(top_p);
  }
  if (Present(body, "top_k")) {
    param = "top_k";
    KVPLAN_ASSIGN_OR_RETURN(request.sampling.top_k, Integer<int>(body, "top_k"));
  }
  param = "seed";
  if (Present(body, "seed")) {
    KVPLAN_ASSIGN_OR_RETURN(const int64_t seed, Integer<int64_t>(body, "seed"));
    request.sampling.seed = uint64_t(seed);
  } else {
    request.sampling.seed = std::random_device()();
  }
  // Each setting checked on its own, so that the error names the field at fault.
  for (const char* field : {"temperature", "top_k", "top_p"}) {
    param = field;
    SamplingSettings alone;
    if (param == "temperature") alone.temperature = request.sampling.temperature;
    if (param == "top_k") alone.top_k = request.sampling.top_k;
    if (param == "top_p") alone.top_p = request.sampling.top_p;
    KVPLAN_RETURN_IF_ERROR(ValidateSamplingSettings(alone));
  }
  if (Present(body, "stop")) {
    param = "stop";
    const json& stop = body["stop"];
    for (const json& item : stop.is_array() ? stop : json::array({stop})) {
      if (!item.is_string() || item.get<std::string>().empty())
        return absl::InvalidArgumentError("stop must be a non-empty string or a list of them");
      request.stops.push_back(item.get<std::string>());
    }
    if (int(request.stops.size()) > kMaxStopStrings)
      return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
  }
  if (Present(body, "stream")) {
    param = "stream";
    if (!body["stream"].is_boolean()) return absl::InvalidArgumentError("stream must be true or false");
    request.stream = body["stream"].get<bool>();
  }
  if (Present(body, "n")) {
    param = "n";
    if (body["n"] != 1) return absl::InvalidArgumentError("only n = 1 is supported");
  }
  param.clear();
  return request;
}

// The text of the tokens generated so far, released as it becomes final: never part of a stop string (the text
// ends before the first one) nor an incomplete UTF-8 character.
class CompletionText {
 public:
  CompletionText(const Tokenizer& tokenizer, std::vector<std::string> stops)
      : tokenizer_(tokenizer), stops_(std::move(stops)) {}

  // Adds tokens and returns the text now final.
  std::string Add(const std::vector<int32_t>& tokens) {
    if (stopped_ || tokens.empty()) return "";
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    std::string text = tokenizer_.Decode(tokens_);
    size_t end = text.size();
    for (const std::string& stop : stops_) {
      const size_t found = text.find(stop, std::min(sent_, text.size()));
      if (found != std::string::npos && found < end) {
        end = found;
        stopped_ = true;
      }
    }
    if (!stopped_) end = std::min(end, FinalEnd(text));
    return Release(text, end);
  }

  // At the end of generation: whatever was held back.
  std::string Flush() {
    if (stopped_) return "";
    const std::string text = tokenizer_.Decode(tokens_);
    return Release(text, text.size());
  }

  bool stopped() const { return stopped_; }
  int64_t tokens() const { return int64_t(tokens_.size()); }

 private:
  // Where the text stops being certain: before a tail that could begin a stop string, and before a UTF-8
  // character whose bytes have not all come.
  size_t FinalEnd(const std::string& text) const {
    size_t end = text.size();
    for (const std::string& stop : stops_)
      for (size_t length = std::min(stop.size() - 1, text.size()); length > 0; --length)
        if (text.compare(text.size() - length, length, stop, 0, length) == 0) {
          end = std::min(end, text.size() - length);
          break;
        }
    for (size_t back = 1; back <= std::min<size_t>(3, end); ++back) {
      const unsigned char byte = static_cast<unsigned char>(text[end - back]);
      if ((byte & 0xC0) == 0x80) continue;  // a continuation byte: look further back for the lead
      const size_t length = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1;
      if (length > back) end -= back;
      break;
    }
    return end;
  }

  std::string Release(const std::string& text, size_t end) {
    if (end <= sent_) return "";
    std::string released = text.substr(sent_, end - sent_);
    sent_ = end;
    return released;
  }

  const Tokenizer& tokenizer_;
  std::vector<std::string> stops_;
  std::vector<int32_t> tokens_;
  size_t sent_ = 0;
  bool stopped_ = false;
};

std::string FinishReasonText(FinishReason reason, bool stopped_by_string) {
  return stopped_by_string || reason == FinishReason::kStop ? "stop" : "length";
}

}  // namespace

struct Server::State {
  ServeOptions options;
  std::string model_name;
  LoadedModel loaded;
  absl::StatusOr<ChatTemplate> chat_template = absl::FailedPreconditionError("");
  std::unique_ptr<Model> model;
  ServeMetrics metrics;
  std::unique_ptr<Scheduler> scheduler;
  httplib::Server http;
  std::atomic<int64_t> next_id{1};
  int listening_port = -1;

  // The prompt's token ids: BOS and the text for completions (as `kvplan generate`), the rendered chat template
  // (which writes its own BOS) for chat.
  absl::StatusOr<std::vector<int32_t>> PromptTokens(const CompletionRequest& request) const {
    if (request.chat) {
      if (!chat_template.ok()) return chat_template.status();
      KVPLAN_ASSIGN_OR_RETURN(std::string prompt, chat_template->Render({.messages = request.messages,
                                                                         .bos_token = loaded.generation.bos_token,
                                                                         .eos_token = loaded.generation.eos_token,
                                                                         .add_generation_prompt = true}));
      return loaded.tokenizer->Encode(prompt);
    }
    return loaded.EncodePrompt(request.prompt_text);
  }

  json Envelope(bool chat, bool chunk, const std::string& id) const {
    return {{"id", id},
            {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
            {"created", int64_t(std::time(nullptr))},
            {"model", model_name}};
  }

  static json Choice(bool chat, bool chunk, const std::string& text, const json& finish_reason) {
    json choice = {{"index", 0}, {"finish_reason", finish_reason}};
    if (!chat) {
      choice["text"] = text;
      choice["logprobs"] = json();
    } else if (chunk) {
      choice["delta"] = finish_reason.is_null() ? json{{"content", text}} : json::object();
    } else {
      choice["message"] = {{"role", "assistant"}, {"content", text}};
    }
    return choice;
  }

  void HandleCompletion(const httplib::Request& http_request, httplib::Response& response, bool chat) {
    absl::StatusOr<json> body = ParseJsonInput(http_request.body, "request body");
    if (!body.ok()) return Reply(response, {400, "invalid_json", std::string(body.status().message())});
    std::string param;
    absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(*body, chat, param);
    if (!request.ok()) return Reply(response, {400, "invalid_value", std::string(request.status().message()), param});
    if (Present(*body, "model") && (*body)["model"] != model_name)
      return Reply(response, {404, "model_not_found",
                              absl::StrCat("the model ", Dump((*body)["model"]),
                                           " does not exist; this server serves \"", model_name, "\""),
                              "model"});
    absl::StatusOr<std::vector<int32_t>> prompt = PromptTokens(*request);
    if (!prompt.ok()) {
      const bool missing_template = chat && loaded.generation.chat_template.empty();
      return Reply(response, {400, missing_template ? "no_chat_template" : "chat_template_error",
                              missing_template ? std::string("the model has no chat template (tokenizer_config.json "
                                                             "has no chat_template); use /v1/completions")
                                               : std::string(prompt.status().message()),
                              "messages"});
    }
    // Without max_tokens a completion writes 16 tokens (OpenAI's default), a chat reply up to the context's end.
    const int max_tokens =
        request->max_tokens.value_or(chat ? std::max(1, model->capacity() - int(prompt->size())) : 16);
    const int64_t prompt_tokens = int64_t(prompt->size());
    absl::StatusOr<std::shared_ptr<GenerationStream>> stream =
        scheduler->Submit({.prompt = *std::move(prompt),
                           .max_tokens = max_tokens,
                           .sampling = request->sampling,
                           .stop_token_ids = loaded.generation.stop_token_ids});
    if (!stream.ok()) {
      const absl::StatusCode code = stream.status().code();
      const char* error_code = code == absl::StatusCode::kOutOfRange          ? "context_length_exceeded"
                               : code == absl::StatusCode::kResourceExhausted ? "kv_memory_exceeded"
                               : code == absl::StatusCode::kUnavailable       ? "server_busy"
                                                                              : "invalid_value";
      return Reply(response, FromStatus(stream.status(), error_code));
    }
    const std::string id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", next_id++);
    auto text = std::make_shared<CompletionText>(*loaded.tokenizer, request->stops);
    if (request->stream) return Stream(response, *stream, text, chat, id);

    std::string content;
    GenerationStream::Update update;
    while (!update.finished && !text->stopped()) {
      update = (*stream)->Next(std::chrono::milliseconds(1000));
      content += text->Add(update.tokens);
    }
    if (text->stopped()) (*stream)->Cancel();
    if (update.finished && update.reason == FinishReason::kError)
      return Reply(response, FromStatus(update.error, "generation_failed"));
    content += text->Flush();
    json reply = Envelope(chat, false, id);
    reply["choices"] = json::array({Choice(chat, false, content, FinishReasonText(update.reason, text->stopped()))});
    reply["usage"] = {{"prompt_tokens", prompt_tokens},
                      {"completion_tokens", text->tokens()},
                      {"total_tokens", prompt_tokens + text->tokens()}};
    response.set_content(Dump(reply), "application/json");
  }

  // Server-sent events: a chunk per piece of final text, a last chunk with the finish reason, then [DONE]. A
  // client that leaves cancels the generation: a failed write ends the provider, and the releaser cancels.
  void Stream(httplib::Response& response, std::shared_ptr<GenerationStream> stream,
              std::shared_ptr<CompletionText> text, bool chat, const std::string& id) {
    auto event = [](const json& data) { return absl::StrCat("data: ", Dump(data), "\n\n"); };
    auto chunk = [this, chat, id, event](const std::string& piece, const json& finish_reason) {
      json data = Envelope(chat, true, id);
      data["choices"] = json::array({Choice(chat, true, piece, finish_reason)});
      return event(data);
    };
    // A chat stream opens with the role, as OpenAI's does.
    json role = Envelope(chat, true, id);
    role["choices"] =
        json::array({{{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"finish_reason", json()}}});
    auto opening = std::make_shared<std::string>(chat ? event(role) : "");
    response.set_header("Cache-Control", "no-cache");
    response.set_chunked_content_provider(
        "text/event-stream",
        [stream, text, chunk, event, opening](size_t, httplib::DataSink& sink) {
          std::string out = std::exchange(*opening, "");
          const GenerationStream::Update update = stream->Next(kPollInterval);
          const std::string piece = text->Add(update.tokens);
          if (!piece.empty()) out += chunk(piece, json());
          const bool done = update.finished || text->stopped();
          if (done) {
            if (text->stopped()) stream->Cancel();
            if (update.finished && update.reason == FinishReason::kError && !text->stopped()) {
              out += event(ErrorObject(FromStatus(update.error, "generation_failed")));
            } else {
              const std::string rest = text->Flush();
              if (!rest.empty()) out += chunk(rest, json());
              out += chunk("", FinishReasonText(update.reason, text->stopped()));
            }
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) return false;
          if (out.empty() && !sink.is_writable()) return false;
          if (done) sink.done();
          return true;
        },
        [stream](bool success) {
          if (!success) stream->Cancel();
        });
  }

  void Route() {
    http.new_task_queue = [threads = options.max_batch + options.max_queue + 8] {
      return new httplib::ThreadPool(threads);
    };
    http.set_payload_max_length(kMaxBodyBytes);
    http.Post("/v1/completions", [this](const httplib::Request& request, httplib::Response& response) {
      HandleCompletion(request, response, false);
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& request, httplib::Response& response) {
      HandleCompletion(request, response, true);
    });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& response) {
      const json models = {
          {"object", "list"},
          {"data", json::array({{{"id", model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "kvplan"}}})}};
      response.set_content(Dump(models), "application/json");
    });
    http.Get("/health", [](const httplib::Request&, httplib::Response& response) {
      response.set_content(R"({"status":"ok"})", "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
      response.set_content(metrics.Render(scheduler->Gauges()), "text/plain; version=0.0.4");
    });
    // Unknown routes, bodies over the limit and anything else httplib answers itself get a JSON error too.
    http.set_error_handler([](const httplib::Request& request, httplib::Response& response) {
      if (!response.body.empty()) return;
      std::string message = absl::StrCat("HTTP ", response.status);
      std::string code = "http_error";
      if (response.status == 404) {
        message = absl::StrCat("no route for ", request.method, " ", request.path);
        code = "not_found";
      } else if (response.status == 413) {
        message = absl::StrCat("the request body exceeds ", kMaxBodyBytes, " bytes");
        code = "request_too_large";
      }
      Reply(response, {response.status, code, message});
    });
    http.set_exception_handler([](const httplib::Request&, httplib::Response& response, std::exception_ptr error) {
      std::string message = "internal error";
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& exception) {
        message = exception.what();
      } catch (...) {
      }
      Reply(response, {500, "internal_error", message});
    });
    http.set_logger(
        [this](const httplib::Request&, const httplib::Response& response) { metrics.CountResponse(response.status); });
  }
};

Server::Server(std::unique_ptr<State> state) : state_(std::move(state)) {}

Server::~Server() { Stop(); }

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServeOptions& options) {
  if (options.max_batch <= 0) return absl::InvalidArgumentError("--max-batch must be positive");
  if (options.max_queue < 0) return absl::InvalidArgumentError("--max-queue must not be negative");
  auto state = std::make_unique<State>();
  state->options = options;
  state->model_name = options.model_name;
  if (state->model_name.empty()) {
    std::filesystem::path folder = std::filesystem::absolute(options.model_dir).lexically_normal();
    if (!folder.has_filename()) folder = folder.parent_path();
    state->model_name = folder.filename().string();
  }
  KVPLAN_ASSIGN_OR_RETURN(const Backend backend, ParseBackend(options.device));
  KVPLAN_ASSIGN_OR_RETURN(state->loaded, OpenModel(options.model_dir));
  if (!state->loaded.generation.chat_template.empty())
    state->chat_template = ChatTemplate::Parse(state->loaded.generation.chat_template);
  const ModelConfig& config = state->loaded.config;
  std::optional<plan::Plan> plan;
  if (!options.plan_path.empty()) {
    KVPLAN_ASSIGN_OR_RETURN(plan, ReadPlanFile(options.plan_path));
  }
  const int context =
      options.context > 0 ? options.context : int(std::min<int64_t>(config.max_position_embeddings, 1 << 30));
  if (context <= 0)
    return absl::InvalidArgumentError("the model's config.json gives no max_position_embeddings; pass --context");
  // Prompts feed in chunks beside the decoding rows: kPlannedChunkRows when a plan compresses (both runtimes
  // chunk so), else a size that keeps a step short.
  const int prefill_chunk = plan ? kPlannedChunkRows : 512;
  const int max_step_rows = options.max_batch + prefill_chunk;
  KVPLAN_ASSIGN_OR_RETURN(state->model, CreateModel(config, *state->loaded.weights,
                                                    {.backend = backend,
                                                     .num_sequences = options.max_batch,
                                                     .capacity = context,
                                                     .max_rows = max_step_rows,
                                                     .plan = plan ? &*plan : nullptr}));
  std::function<int64_t(int64_t)> full_kv_bytes = [config](int64_t length) {
    return FullCacheBytes(config.num_layers, config.num_kv_heads, config.head_dim, length);
  };
  std::function<int64_t(int64_t)> kv_bytes = full_kv_bytes;
  if (plan) kv_bytes = [policy = CachePolicyFromPlan(*plan)](int64_t length) { return CacheBytes(policy, length); };
  const int64_t kv_memory =
      options.kv_memory_bytes > 0 ? options.kv_memory_bytes : int64_t(options.max_batch) * kv_bytes(context);
  state->scheduler = std::make_unique<Scheduler>(*state->model, SchedulerOptions{.kv_memory_bytes = kv_memory,
                                                                                 .max_queue = options.max_queue,
                                                                                 .max_step_rows = max_step_rows,
                                                                                 .prefill_chunk_rows = prefill_chunk,
                                                                                 .kv_bytes = kv_bytes,
                                                                                 .full_kv_bytes = full_kv_bytes,
                                                                                 .metrics = &state->metrics});
  state->Route();
  return std::unique_ptr<Server>(new Server(std::move(state)));
}

absl::StatusOr<int> Server::Bind() {
  State& s = *state_;
  const int port = s.options.port == 0 ? s.http.bind_to_any_port(s.options.host)
                                       : (s.http.bind_to_port(s.options.host, s.options.port) ? s.options.port : -1);
  if (port < 0)
    return absl::UnavailableError(absl::StrCat("cannot listen on ", s.options.host, ":", s.options.port,
                                               " (address in use, or not an address of this machine)"));
  s.listening_port = port;
  return port;
}

absl::Status Server::Listen() {
  if (state_->listening_port < 0) return absl::FailedPreconditionError("Listen before Bind");
  if (!state_->http.listen_after_bind()) return absl::InternalError("the HTTP server stopped with an error");
  return absl::OkStatus();
}

void Server::Stop() {
  // Handlers waiting on generations return once the scheduler has ended them; then httplib can join its threads.
  state_->scheduler->Shutdown();
  state_->http.stop();
}

const std::string& Server::model_name() const { return state_->model_name; }

std::string Server::device_name() const { return state_->model->device_name(); }

absl::Status Server::chat_status() const {
  if (state_->loaded.generation.chat_template.empty())
    return absl::FailedPreconditionError("tokenizer_config.json has no chat_template");
  return state_->chat_template.status();
}

}  // namespace kvplan
