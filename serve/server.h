// `kvplan serve`: an OpenAI-compatible HTTP server (cpp-httplib) over one model with continuous batching
// (serve/scheduler.h). POST /v1/completions and /v1/chat/completions (stream: true as server-sent events ending
// in `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text). Every error answers with a JSON body
// {"error": {"message", "type", "param", "code"}} as OpenAI's API does.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace kvplan {

struct ServeOptions {
  std::string model_dir;
  std::string plan_path;  // execute this cache plan
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port
  std::string device = "auto";
  int max_batch = 8;  // sequences decoded together
  // Admission limit on the KV bytes running requests may grow to (prompt + max_tokens under the cache policy);
  // 0: what max_batch sequences hold at the full context, the storage the runtime reserves anyway.
  int64_t kv_memory_bytes = 0;
  int max_queue = 64;      // requests waiting for a sequence or memory before the server answers 503
  int context = 0;         // positions per sequence; 0: the model's max_position_embeddings
  std::string model_name;  // the id clients name; empty: the model folder's name
};

class Server {
 public:
  // Loads the model, tokenizer, chat template and plan, and starts the scheduler.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServeOptions& options);
  ~Server();

  // Opens the listening socket; returns its port.
  absl::StatusOr<int> Bind();
  // Answers requests until Stop; call after Bind.
  absl::Status Listen();
  // Ends running requests with an error and makes Listen return. Safe from any thread.
  void Stop();

  const std::string& model_name() const;
  std::string device_name() const;
  // OK when chat requests can be served; otherwise why not (no template, or one the renderer refuses).
  absl::Status chat_status() const;

  struct State;

 private:
  explicit Server(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace kvplan
