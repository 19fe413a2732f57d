// Chat prompts through a model's chat template (tokenizer_config.json's "chat_template"): a renderer for the
// subset of Jinja that Llama-3, Qwen2 and Mistral templates use, with Hugging Face's settings (trim_blocks and
// lstrip_blocks on). Supported: text, {{ }}, {# #}, whitespace control (-, +), {% for x in ... %} with loop.index,
// index0, first, last, length, revindex, revindex0; {% if %} / {% elif %} / {% else %}; {% set name = ... %};
// literals (strings, integers, true/false/none, lists), names, .attribute and [subscript]; the operators or, and,
// not, ==, !=, <, >, <=, >=, in, not in, +, -, ~, *, //, %, and `a if b else c`; the tests defined, undefined,
// none, string, number; the filters trim and length; raise_exception(message). Anything else (macros,
// namespace(), other filters, method calls, slices, ...) is refused when the template is parsed, with an error
// naming the construct and its offset in the template.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

struct ChatMessage {
  std::string role;  // system | user | assistant | ...
  std::string content;
};

struct ChatTemplateInputs {
  std::vector<ChatMessage> messages;
  std::string bos_token, eos_token;
  bool add_generation_prompt = true;
};

class ChatTemplate {
 public:
  // InvalidArgument naming a syntax error or an unsupported construct.
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source);
  // The prompt text. InvalidArgument carrying the template's own message when it calls raise_exception (e.g.
  // roles that do not alternate), or naming an operation on values it cannot apply.
  absl::StatusOr<std::string> Render(const ChatTemplateInputs& inputs) const;

  struct Node;

 private:
  explicit ChatTemplate(std::shared_ptr<const std::vector<Node>> body) : body_(std::move(body)) {}
  std::shared_ptr<const std::vector<Node>> body_;
};

}  // namespace kvplan
