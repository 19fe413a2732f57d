// `kvplan serve` under load and faults, in-process on the CPU runtime over loopback: concurrent streaming clients,
// a client that leaves mid-stream, bad requests of every kind, a full queue; every well-formed request completes,
// every bad one gets its status and an OpenAI error object, and /metrics adds up. Also: greedy completions equal
// `kvplan generate`, stop strings cut the text, and chat runs through the model's chat template.
#include "serve/server.h"

#include <httplib.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "eval/evaluate.h"
#include "loader/tokenizer.h"
#include "loader/open_model.h"
#include "nlohmann/json.hpp"
#include "runtime/backend.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int kContext = 256;
// 6 layers x 2 KV heads x 64 dims x (K + V) x 2 bytes: what a full cache of the fixture holds per position.
constexpr int64_t kFixtureBytesPerPosition = 3072;
constexpr int kAdmittedPositions = 240;  // --kv-memory in positions: a request needing more can never run

// A server on a free loopback port, answering from its own thread.
class RunningServer {
 public:
  explicit RunningServer(ServeOptions options) {
    options.host = "127.0.0.1";
    options.port = 0;
    options.device = "cpu";
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(options);
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return;
    server_ = std::move(*server);
    absl::StatusOr<int> port = server_->Bind();
    EXPECT_TRUE(port.ok()) << port.status();
    port_ = port.value_or(0);
    listener_ = std::thread([this] { EXPECT_TRUE(server_->Listen().ok()); });
  }
  ~RunningServer() {
    if (!server_) return;
    server_->Stop();
    listener_.join();
  }

  bool ok() const { return server_ != nullptr && port_ > 0; }
  httplib::Client Client() const {
    httplib::Client client("127.0.0.1", port_);
    client.set_read_timeout(60, 0);
    return client;
  }
  httplib::Result Post(const std::string& path, const std::string& body) const {
    return Client().Post(path.c_str(), body, "application/json");
  }
  std::string Metrics() const {
    httplib::Result result = Client().Get("/metrics");
    return result ? result->body : "";
  }
  const Server& server() const { return *server_; }

 private:
  std::unique_ptr<Server> server_;
  int port_ = 0;
  std::thread listener_;
};

ServeOptions FixtureOptions() {
  return {.model_dir = testing::FixtureModelDir(),
          .max_batch = 4,
          .kv_memory_bytes = kAdmittedPositions * kFixtureBytesPerPosition,
          .max_queue = 32,
          .context = kContext};
}

// The value of a metric line `name` (labels included), or -1.
double MetricValue(const std::string& metrics, const std::string& name) {
  const size_t at = metrics.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(metrics.substr(at + name.size() + 2));
}

// The JSON objects of a server-sent event stream, and whether it ended with [DONE].
struct Events {
  std::vector<json> data;
  bool done = false;
};
Events ParseEvents(const std::string& body) {
  Events events;
  std::istringstream lines(body);
  for (std::string line; std::getline(lines, line);) {
    if (!line.starts_with("data: ")) continue;
    if (line == "data: [DONE]") {
      events.done = true;
      continue;
    }
    events.data.push_back(json::parse(line.substr(6)));
  }
  return events;
}

// Status and the OpenAI error object every failure carries.
void ExpectError(const httplib::Result& result, int status, const std::string& code, const std::string& what) {
  ASSERT_TRUE(result) << what;
  EXPECT_EQ(result->status, status) << what << ": " << result->body;
  const json body = json::parse(result->body, nullptr, false);
  ASSERT_TRUE(body.is_object() && body.contains("error")) << what << ": " << result->body;
  const json& error = body["error"];
  EXPECT_TRUE(error["message"].is_string() && !error["message"].get<std::string>().empty()) << what;
  EXPECT_TRUE(error["type"].is_string()) << what;
  EXPECT_EQ(error["code"], code) << what << ": " << result->body;
}

std::string CompletionBody(const std::string& prompt, int max_tokens, json extra = json::object()) {
  extra["prompt"] = prompt;
  extra["max_tokens"] = max_tokens;
  return extra.dump();
}

TEST(ServeTest, ConcurrentClientsFaultsAndMetrics) {
  RunningServer server(FixtureOptions());
  ASSERT_TRUE(server.ok());
  std::map<int, int> expected_responses;  // by status, for /metrics

  // Eight streaming clients at once (twice the batch: half wait in the queue), and one that leaves after its
  // first event while it still had 200 tokens to go.
  constexpr int kClients = 8, kMaxTokens = 12;
  std::vector<Events> streams(kClients);
  std::vector<int> statuses(kClients, 0);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      httplib::Result result =
          server.Post("/v1/completions", CompletionBody("git-log(" + std::to_string(i) + ")", kMaxTokens,
                                                        {{"stream", true}, {"temperature", 0.8}, {"seed", i}}));
      if (!result) return;
      statuses[i] = result->status;
      streams[i] = ParseEvents(result->body);
    });
  std::atomic<int> received_before_leaving{0};
  std::thread leaver([&] {
    httplib::Request request;
    request.method = "POST";
    request.path = "/v1/completions";
    request.set_header("Content-Type", "application/json");
    request.body = CompletionBody("git-rebase(1)", 200, {{"stream", true}, {"temperature", 0}});
    request.content_receiver = [&](const char*, size_t length, uint64_t, uint64_t) {
      received_before_leaving += int(length);
      return false;  // hang up
    };
    server.Client().send(request);
  });
  for (std::thread& client : clients) client.join();
  leaver.join();
  EXPECT_GT(received_before_leaving, 0);
  for (int i = 0; i < kClients; ++i) {
    EXPECT_EQ(statuses[i], 200) << "client " << i;
    EXPECT_TRUE(streams[i].done) << "client " << i;
    ASSERT_FALSE(streams[i].data.empty()) << "client " << i;
    const json& last = streams[i].data.back()["choices"][0];
    EXPECT_TRUE(last["finish_reason"] == "length" || last["finish_reason"] == "stop") << last;
  }
  expected_responses[200] += kClients + 1;  // the leaver's response began as a 200

  // Bad requests, each answered while the server goes on.
  std::string long_prompt;
  for (int i = 0; i < 200; ++i) long_prompt += "git commit --amend ";
  ExpectError(server.Post("/v1/completions", "{\"prompt\": \"x\""), 400, "invalid_json", "malformed JSON");
  ExpectError(server.Post("/v1/completions", CompletionBody(long_prompt, 8)), 400, "context_length_exceeded",
              "prompt longer than the context");
  ExpectError(server.Post("/v1/completions", CompletionBody("git", kAdmittedPositions)), 413, "kv_memory_exceeded",
              "more KV memory than the server has");
  ExpectError(server.Post("/v1/completions", CompletionBody("git", 4, {{"model", "gpt-4"}})), 404, "model_not_found",
              "unknown model");
  ExpectError(server.Client().Get("/v1/engines"), 404, "not_found", "unknown route");
  ExpectError(server.Post("/v1/completions", CompletionBody("git", 4, {{"temperature", -1}})), 400, "invalid_value",
              "negative temperature");
  ExpectError(server.Post("/v1/completions", CompletionBody("git", 4, {{"n", 2}})), 400, "invalid_value", "n = 2");
  ExpectError(server.Post("/v1/completions", R"({"prompt": 5})"), 400, "invalid_value", "prompt not a string");
  ExpectError(server.Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}]})"), 400,
              "no_chat_template", "chat without a template");
  expected_responses[400] += 6;
  expected_responses[404] += 2;
  expected_responses[413] += 1;

  // Still serving: a plain completion and the read-only routes.
  httplib::Result after = server.Post("/v1/completions", CompletionBody("git-diff(1)", 4, {{"model", "llama-dev-6m"}}));
  ASSERT_TRUE(after);
  EXPECT_EQ(after->status, 200) << after->body;
  httplib::Result models = server.Client().Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "llama-dev-6m");
  httplib::Result health = server.Client().Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  expected_responses[200] += 3;

  // The leaver's sequence is freed: it ends cancelled, long before its 200 tokens, and nothing keeps running.
  // httplib counts a response once it is written, so /metrics may trail the client by a response or two: poll
  // until everything adds up (each earlier poll is a 200 of its own).
  auto responses_add_up = [&](const std::string& metrics) {
    for (const auto& [status, count] : expected_responses)
      if (MetricValue(metrics, "kvplan_http_responses_total{status=\"" + std::to_string(status) + "\"}") != count)
        return false;
    return true;
  };
  std::string metrics;
  for (int attempt = 0; attempt < 400; ++attempt) {
    if (attempt > 0) {
      expected_responses[200] += 1;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    metrics = server.Metrics();
    if (MetricValue(metrics, "kvplan_requests_running") == 0 &&
        MetricValue(metrics, "kvplan_generations_total{reason=\"cancelled\"}") == 1 && responses_add_up(metrics))
      break;
  }
  EXPECT_EQ(MetricValue(metrics, "kvplan_requests_running"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "kvplan_requests_queued"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "kvplan_kv_reserved_bytes"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "kvplan_generations_total{reason=\"cancelled\"}"), 1) << metrics;
  const double finished_by_length = MetricValue(metrics, "kvplan_generations_total{reason=\"length\"}");
  const double finished_by_stop = std::max(0.0, MetricValue(metrics, "kvplan_generations_total{reason=\"stop\"}"));
  EXPECT_EQ(finished_by_length + finished_by_stop, kClients + 1) << metrics;
  EXPECT_LT(MetricValue(metrics, "kvplan_completion_tokens_total"), (kClients + 1) * kMaxTokens + 200) << metrics;
  EXPECT_EQ(MetricValue(metrics, "kvplan_time_to_first_token_seconds_count"), kClients + 2) << metrics;
  EXPECT_TRUE(responses_add_up(metrics)) << metrics;
}

// OpenAI fields the server does not implement are refused naming them unless they carry the value that asks for
// nothing; temperature, top_p and top_k are each checked against their own range and named when wrong.
TEST(ServeTest, UnsupportedFieldsAndSamplingRangesAreRefusedNamingTheField) {
  RunningServer server(FixtureOptions());
  ASSERT_TRUE(server.ok());
  auto expect_param = [&](const json& extra, const std::string& param) {
    const httplib::Result result = server.Post("/v1/completions", CompletionBody("git", 2, extra));
    ExpectError(result, 400, "invalid_value", extra.dump());
    if (result) {
      EXPECT_EQ(json::parse(result->body)["error"]["param"], param) << result->body;
    }
  };
  expect_param({{"echo", true}}, "echo");
  expect_param({{"best_of", 3}}, "best_of");
  expect_param({{"suffix", "end"}}, "suffix");
  expect_param({{"presence_penalty", 0.5}}, "presence_penalty");
  expect_param({{"frequency_penalty", -1}}, "frequency_penalty");
  expect_param({{"logit_bias", {{"50256", -100}}}}, "logit_bias");
  expect_param({{"tools", json::array({{{"type", "function"}}})}}, "tools");
  expect_param({{"response_format", {{"type", "json_object"}}}}, "response_format");
  expect_param({{"stream", true}, {"stream_options", {{"include_usage", true}}}}, "stream_options");
  expect_param({{"temperature", 1e30}}, "temperature");
  expect_param({{"temperature", 2.5}}, "temperature");
  expect_param({{"top_p", 0}}, "top_p");
  expect_param({{"top_k", -1}}, "top_k");
  // The neutral values are served.
  const httplib::Result neutral = server.Post(
      "/v1/completions",
      CompletionBody("git", 2,
                     {{"echo", false}, {"best_of", 1}, {"suffix", ""}, {"presence_penalty", 0},
                      {"frequency_penalty", 0}, {"logit_bias", json::object()}, {"tools", json::array()},
                      {"response_format", {{"type", "text"}}}, {"temperature", 2}, {"top_p", 1}, {"top_k", 0}}));
  ASSERT_TRUE(neutral);
  EXPECT_EQ(neutral->status, 200) << neutral->body;
}

TEST(ServeTest, GreedyCompletionEqualsGenerateAndStopStringsCut) {
  RunningServer server(FixtureOptions());
  ASSERT_TRUE(server.ok());
  const std::string prompt = "git-show(1)";
  const int max_tokens = 24;
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(
      model, CreateModel(loaded.config, *loaded.weights, {.backend = Backend::kCpu, .capacity = kContext}));
  const std::vector<int32_t> ids = loaded.EncodePrompt(prompt);
  KVPLAN_ASSERT_OK_AND_ASSIGN(generated, GenerateGreedy(*model, ids, max_tokens, loaded.config.eos_token_id));
  if (!generated.empty() && generated.back() == loaded.config.eos_token_id) generated.pop_back();
  const std::string expected = loaded.tokenizer->Decode(generated);

  httplib::Result result = server.Post("/v1/completions", CompletionBody(prompt, max_tokens, {{"temperature", 0}}));
  ASSERT_TRUE(result);
  ASSERT_EQ(result->status, 200) << result->body;
  const json reply = json::parse(result->body);
  EXPECT_EQ(reply["choices"][0]["text"], expected);
  EXPECT_EQ(reply["usage"]["prompt_tokens"], int(ids.size()));

  // Streamed, the pieces add up to the same text.
  result = server.Post("/v1/completions", CompletionBody(prompt, max_tokens, {{"temperature", 0}, {"stream", true}}));
  ASSERT_TRUE(result);
  const Events events = ParseEvents(result->body);
  std::string streamed;
  for (const json& event : events.data) streamed += event["choices"][0]["text"].get<std::string>();
  EXPECT_TRUE(events.done);
  EXPECT_EQ(streamed, expected);

  // A stop string ends the text before it, streamed or not.
  ASSERT_GT(expected.size(), 8u);
  const std::string stop = expected.substr(expected.size() / 2, 3);
  const std::string before_stop = expected.substr(0, expected.find(stop));
  for (bool stream : {false, true}) {
    result = server.Post("/v1/completions", CompletionBody(prompt, max_tokens,
                                                           {{"temperature", 0}, {"stream", stream}, {"stop", {stop}}}));
    ASSERT_TRUE(result);
    std::string text;
    json finish_reason;
    if (stream) {
      for (const json& event : ParseEvents(result->body).data) {
        text += event["choices"][0]["text"].get<std::string>();
        finish_reason = event["choices"][0]["finish_reason"];
      }
    } else {
      text = json::parse(result->body)["choices"][0]["text"];
      finish_reason = json::parse(result->body)["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(text, before_stop) << "stream " << stream;
    EXPECT_EQ(finish_reason, "stop") << "stream " << stream;
  }
}

// A copy of the fixture whose tokenizer_config.json carries Llama-3's chat template.
class TemplatedModel {
 public:
  TemplatedModel() : dir_(fs::temp_directory_path() / ("kvplan_serve_chat_" + std::to_string(::getpid()))) {
    fs::create_directories(dir_);
    for (const char* name : {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"})
      fs::create_symlink(fs::absolute(fs::path(testing::FixtureModelDir()) / name), dir_ / name);
    std::ifstream source(std::string(KVPLAN_SERVE_TEST_DATA_DIR) + "/llama3.jinja");
    std::stringstream chat_template;
    chat_template << source.rdbuf();
    std::ofstream(dir_ / "tokenizer_config.json") << json{
        {"bos_token", "<|begin_of_text|>"},
        {"eos_token", "<|end_of_text|>"},
        {"chat_template", chat_template.str()}}.dump();
  }
  ~TemplatedModel() { fs::remove_all(dir_); }
  std::string dir() const { return dir_.string(); }

 private:
  fs::path dir_;
};

TEST(ServeTest, ChatThroughTheTemplateAndAFullQueue) {
  const TemplatedModel model;
  ServeOptions options = FixtureOptions();
  options.model_dir = model.dir();
  options.model_name = "chat-6m";
  options.max_batch = 1;
  options.max_queue = 0;
  options.context = 1024;  // room for a stream long enough to be running still when the second request comes
  options.kv_memory_bytes = 0;
  RunningServer server(options);
  ASSERT_TRUE(server.ok());
  const json messages = {{{"role", "system"}, {"content", "Answer with git commands."}},
                         {{"role", "user"}, {"content", "How do I see a commit?"}}};
  httplib::Result result =
      server.Post("/v1/chat/completions", json{{"messages", messages}, {"max_tokens", 8}, {"model", "chat-6m"}}.dump());
  ASSERT_TRUE(result);
  ASSERT_EQ(result->status, 200) << result->body;
  const json reply = json::parse(result->body);
  EXPECT_EQ(reply["object"], "chat.completion");
  EXPECT_EQ(reply["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(reply["choices"][0]["message"]["content"].is_string());
  EXPECT_GT(reply["usage"]["prompt_tokens"], 20);

  // One sequence and no queue: while a long stream runs, another request is turned away with 503.
  std::atomic<bool> streaming{false}, leave{false};
  std::thread first([&] {
    httplib::Request request;
    request.method = "POST";
    request.path = "/v1/chat/completions";
    request.set_header("Content-Type", "application/json");
    request.body = json{{"messages", messages}, {"max_tokens", 900}, {"stream", true}}.dump();
    std::string received;
    request.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
      received.append(data, length);
      if (received.find("\"content\":\"") != std::string::npos) streaming = true;
      return !leave;
    };
    server.Client().send(request);
    EXPECT_NE(received.find("chat.completion.chunk"), std::string::npos);
    EXPECT_NE(received.find("\"role\":\"assistant\""), std::string::npos);
  });
  for (int attempt = 0; attempt < 10000 && !streaming; ++attempt)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(streaming);
  ExpectError(server.Post("/v1/chat/completions", json{{"messages", messages}, {"max_tokens", 4}}.dump()), 503,
              "server_busy", "a full queue");
  leave = true;
  first.join();
  // The stream that left freed the only sequence: the next request runs.
  for (int attempt = 0; attempt < 400; ++attempt) {
    result = server.Post("/v1/chat/completions", json{{"messages", messages}, {"max_tokens", 4}}.dump());
    if (!result || result->status != 503) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(result);
  EXPECT_EQ(result->status, 200) << result->body;
}

}  // namespace
}  // namespace kvplan
