// The chat template renderer on the templates of Llama-3, Mistral-Instruct and Qwen2 (tests/serve/data, copied
// from their tokenizer_config.json files), Hugging Face's whitespace settings, and the constructs it refuses.
#include "serve/chat_template.h"

#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

namespace kvplan {
namespace {

std::string ReadTemplate(const std::string& name) {
  std::ifstream file(std::string(KVPLAN_SERVE_TEST_DATA_DIR) + "/" + name);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

absl::StatusOr<std::string> Render(const std::string& source, const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt = true) {
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::Parse(source);
  if (!chat_template.ok()) return chat_template.status();
  return chat_template->Render(
      {.messages = messages, .bos_token = "<s>", .eos_token = "</s>", .add_generation_prompt = add_generation_prompt});
}

TEST(ChatTemplateTest, Llama3) {
  absl::StatusOr<std::string> prompt =
      Render(ReadTemplate("llama3.jinja"), {{"system", "You are terse."}, {"user", "  Hi there \n"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt,
            "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  prompt = Render(ReadTemplate("llama3.jinja"), {{"user", "x"}}, /*add_generation_prompt=*/false);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt, "<s><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>");
}

TEST(ChatTemplateTest, MistralAndItsRoleChecks) {
  const std::string source = ReadTemplate("mistral.jinja");
  absl::StatusOr<std::string> prompt = Render(source, {{"user", "a"}, {"assistant", "b"}, {"user", "c"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt, "<s>[INST] a [/INST]b</s>[INST] c [/INST]");
  prompt = Render(source, {{"user", "a"}, {"user", "b"}});
  EXPECT_EQ(prompt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(prompt.status().message().find("Conversation roles must alternate"), std::string::npos) << prompt.status();
}

TEST(ChatTemplateTest, Qwen2AddsItsDefaultSystemMessage) {
  absl::StatusOr<std::string> prompt = Render(ReadTemplate("qwen2.jinja"), {{"user", "hi"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, TrimBlocksLstripBlocksAndWhitespaceControl) {
  const std::string source =
      "{# a comment #}\n"
      "{% for message in messages %}\n"
      "    {% if message.role == 'system' %}\n"
      "<<SYS>>{{ message.content }}<</SYS>>\n"
      "    {% else %}\n"
      "  [{{ loop.index }}/{{ loop.length }}] {{ message.content }}\n"
      "    {%- endif %}\n"
      "{% endfor %}\n"
      "{%+ if true %}end{% endif %}";
  absl::StatusOr<std::string> prompt = Render(source, {{"system", "s"}, {"user", "u"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt, "<<SYS>>s<</SYS>>\n  [2/2] uend");
}

TEST(ChatTemplateTest, ExpressionsFollowJinja) {
  absl::StatusOr<std::string> text = Render(
      "{{ 7 // 2 }}{{ -7 % 3 }}{{ 'a' ~ 1 }}{{ 'b' in 'abc' }}{{ 3 if false else 4 }}{{ [1, 2] | length }}"
      "{{ '\xc3\xa9' | length }}{{ x is defined }}{{ messages[0].role }}{{ messages[-1]['content'] }}"
      "{{ not (1 < 2 and 2 >= 3) or none }}{% set n = messages | length %}{{ n * 10 - 1 }}{{ 'k' not in ['k'] }}",
      {{"user", "first"}, {"assistant", "last"}});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "32a1True421FalseuserlastTrue19False");
}

TEST(ChatTemplateTest, UnsupportedConstructsAreNamed) {
  const std::pair<const char*, const char*> cases[] = {
      {"{% macro greet() %}hi{% endmacro %}", "macro"},
      {"{{ messages | tojson }}", "tojson"},
      {"{% set ns = namespace(found=false) %}", "namespace"},
      {"{% for m in messages[::-1] %}{% endfor %}", "slices"},
      {"{{ 'a'.upper() }}", "upper"},
      {"{% if true %}open", "endif"},
      {"{{ 1 / 2 }}", "'/'"},
      {"{{ 1.5 }}", "floating-point"},
      {"{% for m in messages %}{% else %}{% endfor %}", "else"},
      {"{{ 'unterminated }}", "unterminated"},
      {"{{ x", "never closed"},
      {"{% endfor %}", "endfor"},
  };
  for (const auto& [source, named] : cases) {
    absl::StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(source);
    ASSERT_FALSE(parsed.ok()) << source;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << source;
    EXPECT_NE(parsed.status().message().find(named), std::string::npos) << source << ": " << parsed.status();
  }
}

TEST(ChatTemplateTest, DeepNestingIsRefused) {
  std::string source = "{{ " + std::string(10000, '(') + "1" + std::string(10000, ')') + " }}";
  EXPECT_EQ(ChatTemplate::Parse(source).status().code(), absl::StatusCode::kInvalidArgument);
  source.clear();
  for (int i = 0; i < 1000; ++i) source += "{% if true %}";
  EXPECT_EQ(ChatTemplate::Parse(source).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvplan
