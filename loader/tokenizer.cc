#include "loader/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "base/input_file.h"
#include "base/status_macros.h"
#include "loader/json_input.h"
#include "nlohmann/json.hpp"

namespace kvplan {
namespace {

using nlohmann::json;

constexpr std::string_view kMetaspace = "\xe2\x96\x81";  // U+2581, SentencePiece's word-start marker
// GPT-2's pre-tokenizer, used by a ByteLevel pre-tokenizer with use_regex=true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

size_t Utf8Length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xe) return 3;
  if ((lead >> 3) == 0x1e) return 4;
  return 1;  // invalid lead byte: treat as one unit so encoding always makes progress
}

std::string CodepointToUtf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xc0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xe0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
  return out;
}

// The byte a SentencePiece byte-fallback token ("<0x41>") stands for.
std::optional<char> ByteFallbackValue(const std::string& token) {
  int byte;
  if (token.size() != 6 || !token.starts_with("<0x") || token.back() != '>' ||
      !absl::SimpleHexAtoi(token.substr(3, 2), &byte))
    return std::nullopt;
  return char(byte);
}

// GPT-2's reversible map from bytes to printable unicode characters.
std::vector<std::string> ByteToUnicodeTable() {
  std::vector<std::string> table(256);
  int next = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = CodepointToUtf8(printable ? b : 256 + next++);
  }
  return table;
}

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern) {
    int error_code;
    PCRE2_SIZE error_offset;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error_code, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error_code, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad pre-tokenizer regex at offset ", error_offset,
                                                     ": ", reinterpret_cast<char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
    return std::unique_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }

  // Splits like HF's Split(behavior=Isolated): matches and the gaps between them both become pieces.
  void SplitIsolated(std::string_view text, std::vector<std::string>& out) const {
    pcre2_match_data* match = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t previous = 0, offset = 0;
    while (offset < text.size()) {
      const int rc =
          pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), offset, 0, match, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
      const size_t begin = ovector[0], end = ovector[1];
      if (begin > previous) out.emplace_back(text.substr(previous, begin - previous));
      if (end > begin) out.emplace_back(text.substr(begin, end - begin));
      previous = end;
      offset = end > begin ? end : begin + Utf8Length(text[begin]);
    }
    if (previous < text.size()) out.emplace_back(text.substr(previous));
    pcre2_match_data_free(match);
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// One step of HF's pre-tokenizer pipeline.
struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel, kMetaspace } kind;
  std::unique_ptr<Regex> regex;   // kSplit, and kByteLevel with use_regex
  bool add_prefix_space = false;  // kByteLevel
  std::string prepend_scheme;     // kMetaspace: always | first | never
  bool split = false;             // kMetaspace
};

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_token;
  absl::flat_hash_map<std::string, int32_t> token_to_id;
  // (left, right) → (rank, merged id)
  absl::flat_hash_map<std::pair<int32_t, int32_t>, std::pair<int32_t, int32_t>> merges;
  std::vector<std::pair<std::string, int32_t>> added_tokens;  // sorted longest first
  std::string added_token_first_bytes;
  std::vector<PreTokenizerStep> steps;
  bool byte_level = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  int32_t unk_id = -1;
  // SentencePiece-style normalizer: optional Prepend(▁) then Replace(" ", ▁).
  std::string normalizer_prepend;
  bool normalizer_replace_space = false;
  bool decoder_strip_leading_space = false;
  std::vector<std::string> byte_to_unicode;
  absl::flat_hash_map<std::string, uint8_t> unicode_to_byte;
  std::vector<int32_t> byte_fallback_ids;  // <0xXX> → id, or -1

  void BytePairMerge(std::vector<int32_t>& symbols) const;
  void EncodeWord(const std::string& word, std::vector<int32_t>& out) const;
  void EncodeSegment(std::string segment, bool first_segment, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::BytePairMerge(std::vector<int32_t>& symbols) const {
  // Linked list over the symbols plus a heap of candidate merges, validated when popped: O(n log n).
  const int n = int(symbols.size());
  if (n < 2) return;
  std::vector<int> previous(n), next(n);
  for (int i = 0; i < n; ++i) {
    previous[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int left;
    int32_t left_id, right_id;
    bool operator>(const Candidate& other) const { return rank != other.rank ? rank > other.rank : left > other.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const auto it = merges.find({symbols[left], symbols[next[left]]});
    if (it != merges.end()) heap.push({it->second.first, left, symbols[left], symbols[next[left]]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    const int right = next[top.left];
    if (symbols[top.left] != top.left_id || right < 0 || symbols[right] != top.right_id) continue;  // stale
    symbols[top.left] = merges.find({top.left_id, top.right_id})->second.second;
    symbols[right] = -1;
    next[top.left] = next[right];
    if (next[right] >= 0) previous[next[right]] = top.left;
    push(previous[top.left]);
    push(top.left);
  }
  std::erase(symbols, -1);
}

void Tokenizer::Impl::EncodeWord(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    if (const auto it = token_to_id.find(word); it != token_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> symbols;
  for (size_t i = 0; i < word.size();) {
    const size_t length = std::min(Utf8Length(word[i]), word.size() - i);
    const std::string character = word.substr(i, length);
    if (const auto it = token_to_id.find(character); it != token_to_id.end()) {
      symbols.push_back(it->second);
    } else if (byte_fallback) {
      for (unsigned char byte : character)
        if (byte_fallback_ids[byte] >= 0) symbols.push_back(byte_fallback_ids[byte]);
    } else if (unk_id >= 0) {
      symbols.push_back(unk_id);
    }
    i += length;
  }
  BytePairMerge(symbols);
  out.insert(out.end(), symbols.begin(), symbols.end());
}

void Tokenizer::Impl::EncodeSegment(std::string segment, bool first_segment, std::vector<int32_t>& out) const {
  if (!normalizer_prepend.empty()) segment = normalizer_prepend + segment;
  if (normalizer_replace_space) segment = absl::StrReplaceAll(segment, {{" ", std::string(kMetaspace)}});
  std::vector<std::string> pieces = {std::move(segment)};
  for (const PreTokenizerStep& step : steps) {
    std::vector<std::string> next_pieces;
    for (std::string& piece : pieces) {
      switch (step.kind) {
        case PreTokenizerStep::Kind::kSplit: step.regex->SplitIsolated(piece, next_pieces); break;
        case PreTokenizerStep::Kind::kByteLevel: {
          if (step.add_prefix_space && !piece.starts_with(' ')) piece = " " + piece;
          std::vector<std::string> split;
          if (step.regex) {
            step.regex->SplitIsolated(piece, split);
          } else {
            split.push_back(piece);
          }
          for (const std::string& part : split) {
            std::string mapped;
            for (unsigned char byte : part) mapped += byte_to_unicode[byte];
            next_pieces.push_back(std::move(mapped));
          }
          break;
        }
        case PreTokenizerStep::Kind::kMetaspace: {
          std::string replaced = absl::StrReplaceAll(piece, {{" ", std::string(kMetaspace)}});
          const bool prepend = step.prepend_scheme == "always" || (step.prepend_scheme == "first" && first_segment);
          if (prepend && !replaced.starts_with(kMetaspace)) replaced = std::string(kMetaspace) + replaced;
          if (!step.split) {
            next_pieces.push_back(std::move(replaced));
            break;
          }
          size_t start = 0;
          for (size_t at = replaced.find(kMetaspace, 1); at != std::string::npos;
               at = replaced.find(kMetaspace, at + kMetaspace.size())) {
            next_pieces.push_back(replaced.substr(start, at - start));
            start = at;
          }
          next_pieces.push_back(replaced.substr(start));
          break;
        }
      }
    }
    pieces = std::move(next_pieces);
  }
  for (const std::string& piece : pieces) EncodeWord(piece, out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

int Tokenizer::vocab_size() const { return int(impl_->id_to_token.size()); }

int32_t Tokenizer::TokenId(const std::string& token) const {
  const auto it = impl_->token_to_id.find(token);
  return it == impl_->token_to_id.end() ? -1 : it->second;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  size_t segment_start = 0;
  bool first_segment = true;
  auto flush = [&](size_t end) {
    if (end > segment_start) {
      impl_->EncodeSegment(std::string(text.substr(segment_start, end - segment_start)), first_segment, ids);
      first_segment = false;
    }
  };
  for (size_t i = 0; i < text.size(); ++i) {
    if (impl_->added_token_first_bytes.find(text[i]) == std::string::npos) continue;
    for (const auto& [content, id] : impl_->added_tokens) {
      if (text.substr(i).starts_with(content)) {
        flush(i);
        ids.push_back(id);
        i += content.size() - 1;
        segment_start = i + 1;
        break;
      }
    }
  }
  flush(text.size());
  return ids;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    const std::string& token = impl_->id_to_token[id];
    if (impl_->byte_level) {
      bool all_mapped = true;
      std::string bytes;
      for (size_t i = 0; i < token.size();) {
        const size_t length = std::min(Utf8Length(token[i]), token.size() - i);
        const auto it = impl_->unicode_to_byte.find(token.substr(i, length));
        if (it == impl_->unicode_to_byte.end()) {
          all_mapped = false;
          break;
        }
        bytes += char(it->second);
        i += length;
      }
      text += all_mapped ? bytes : token;  // added tokens are stored verbatim
    } else if (const std::optional<char> byte = ByteFallbackValue(token)) {
      text += *byte;
    } else {
      text += absl::StrReplaceAll(token, {{std::string(kMetaspace), " "}});
    }
  }
  if (impl_->decoder_strip_leading_space && text.starts_with(' ')) text.erase(0, 1);
  return text;
}

namespace {

absl::Status TokenizerError(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", message));
}

absl::Status AddPreTokenizer(const json& node, std::vector<PreTokenizerStep>& steps, bool& byte_level) {
  if (node.is_null()) return absl::OkStatus();
  const std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const json& child : node.value("pretokenizers", json::array()))
      KVPLAN_RETURN_IF_ERROR(AddPreTokenizer(child, steps, byte_level));
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    const json pattern = node.value("pattern", json::object());
    if (node.value("invert", false) || node.value("behavior", "Isolated") != "Isolated")
      return TokenizerError("only Split pre-tokenizers with behavior Isolated and invert=false are supported");
    std::string regex;
    if (pattern.contains("Regex")) {
      regex = pattern["Regex"].get<std::string>();
    } else if (pattern.contains("String")) {
      // A literal: quote it for PCRE2.
      regex = "\\Q" + pattern["String"].get<std::string>() + "\\E";
    } else {
      return TokenizerError("Split pre-tokenizer without a pattern");
    }
    KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<Regex> compiled, Regex::Compile(regex));
    step.kind = PreTokenizerStep::Kind::kSplit;
    step.regex = std::move(compiled);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = node.value("add_prefix_space", false);
    if (node.value("use_regex", true)) {
      KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<Regex> compiled, Regex::Compile(kGpt2Pattern));
      step.regex = std::move(compiled);
    }
    byte_level = true;
  } else if (type == "Metaspace") {
    step.kind = PreTokenizerStep::Kind::kMetaspace;
    if (node.value("replacement", std::string(kMetaspace)) != kMetaspace)
      return TokenizerError("Metaspace pre-tokenizer with a replacement other than U+2581 is not supported");
    const bool legacy_add_prefix = node.value("add_prefix_space", true);
    step.prepend_scheme = node.value("prepend_scheme", legacy_add_prefix ? "always" : "never");
    step.split = node.value("split", true);
  } else {
    return TokenizerError(absl::StrCat("pre-tokenizer type \"", type, "\" is not supported"));
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ParseNormalizer(const json& node, Tokenizer::Impl& impl) {
  if (node.is_null()) return absl::OkStatus();
  const std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const json& child : node.value("normalizers", json::array()))
      KVPLAN_RETURN_IF_ERROR(ParseNormalizer(child, impl));
    return absl::OkStatus();
  }
  if (type == "Prepend") {
    impl.normalizer_prepend = node.value("prepend", "");
    return absl::OkStatus();
  }
  if (type == "Replace") {
    const json pattern = node.value("pattern", json::object());
    if (pattern.value("String", "") == " " && node.value("content", "") == kMetaspace) {
      impl.normalizer_replace_space = true;
      return absl::OkStatus();
    }
  }
  return TokenizerError(
      absl::StrCat("normalizer \"", type, "\" is not supported (supported: Prepend, Replace(' ', U+2581))"));
}

bool DecoderStripsLeadingSpace(const json& node) {
  if (node.is_null()) return false;
  const std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const json& child : node.value("decoders", json::array()))
      if (DecoderStripsLeadingSpace(child)) return true;
    return false;
  }
  if (type == "Strip") return node.value("start", 0) > 0;
  if (type == "Metaspace")
    return node.value("prepend_scheme", "always") != "never" && node.value("add_prefix_space", true);
  return false;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text) {
  KVPLAN_ASSIGN_OR_RETURN(const json root, ParseJsonInput(json_text, "tokenizer.json"));
  if (!root.is_object()) return TokenizerError("not a JSON object");
  auto impl = std::make_unique<Impl>();
  // json's accessors throw on a value of the wrong type; any of them means a malformed file.
  try {
    const json model = root.value("model", json::object());
    if (model.value("type", "") != "BPE")
      return TokenizerError(absl::StrCat("model type \"", model.value("type", "?"), "\" is not supported (only BPE)"));
    const json vocab = model.at("vocab");
    const json added_tokens = root.value("added_tokens", json::array());
    // Ids may leave gaps, but the table they index must not outgrow the file that lists them.
    const int64_t id_bound = int64_t(vocab.size() + added_tokens.size());
    auto token_id = [id_bound](const json& id) -> absl::StatusOr<int32_t> {
      const std::optional<int32_t> value = JsonInteger<int32_t>(id);
      if (!value.has_value() || *value < 0 || *value >= id_bound)
        return TokenizerError(absl::StrCat("token id ", id.dump(), " is outside [0, ", id_bound, ")"));
      return *value;
    };
    impl->id_to_token.resize(size_t(id_bound));
    int32_t max_id = -1;
    for (const auto& [token, id_value] : vocab.items()) {
      KVPLAN_ASSIGN_OR_RETURN(const int32_t id, token_id(id_value));
      max_id = std::max(max_id, id);
      impl->id_to_token[id] = token;
      impl->token_to_id[token] = id;
    }
    for (const json& added : added_tokens) {
      const std::string content = added.at("content").get<std::string>();
      if (content.empty()) return TokenizerError("an added token has empty content");
      KVPLAN_ASSIGN_OR_RETURN(const int32_t id, token_id(added.at("id")));
      max_id = std::max(max_id, id);
      impl->id_to_token[id] = content;
      impl->token_to_id[content] = id;
      impl->added_tokens.emplace_back(content, id);
      if (impl->added_token_first_bytes.find(content[0]) == std::string::npos)
        impl->added_token_first_bytes += content[0];
    }
    impl->id_to_token.resize(size_t(max_id + 1));
    std::sort(impl->added_tokens.begin(), impl->added_tokens.end(),
              [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    int32_t rank = 0;
    for (const json& merge : model.at("merges")) {
      std::string left, right;
      if (merge.is_array()) {  // tokenizers >= 0.20 writes ["a", "b"]
        left = merge.at(0).get<std::string>();
        right = merge.at(1).get<std::string>();
      } else {  // older files write "a b"
        const std::string pair = merge.get<std::string>();
        const size_t space = pair.find(' ', 1);
        if (space == std::string::npos) return TokenizerError(absl::StrCat("bad merge \"", pair, "\""));
        left = pair.substr(0, space);
        right = pair.substr(space + 1);
      }
      const auto l = impl->token_to_id.find(left), r = impl->token_to_id.find(right),
                 merged = impl->token_to_id.find(left + right);
      if (l == impl->token_to_id.end() || r == impl->token_to_id.end() || merged == impl->token_to_id.end())
        return TokenizerError(absl::StrCat("merge \"", left, " ", right, "\" refers to a token not in the vocabulary"));
      impl->merges.try_emplace({l->second, r->second}, rank++, merged->second);
    }
    impl->byte_fallback = model.value("byte_fallback", false);
    impl->ignore_merges = model.value("ignore_merges", false);
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      const auto unk = impl->token_to_id.find(model["unk_token"].get<std::string>());
      if (unk != impl->token_to_id.end()) impl->unk_id = unk->second;
    }
    KVPLAN_RETURN_IF_ERROR(ParseNormalizer(root.value("normalizer", json()), *impl));
    KVPLAN_RETURN_IF_ERROR(AddPreTokenizer(root.value("pre_tokenizer", json()), impl->steps, impl->byte_level));
    impl->decoder_strip_leading_space = DecoderStripsLeadingSpace(root.value("decoder", json()));
  } catch (const json::exception& e) {
    return TokenizerError(absl::StrCat("malformed file: ", e.what()));
  }
  impl->byte_to_unicode = ByteToUnicodeTable();
  for (int b = 0; b < 256; ++b) impl->unicode_to_byte[impl->byte_to_unicode[b]] = uint8_t(b);
  impl->byte_fallback_ids.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    if (const auto it = impl->token_to_id.find(name); it != impl->token_to_id.end())
      impl->byte_fallback_ids[b] = it->second;
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  KVPLAN_ASSIGN_OR_RETURN(const std::string text, ReadInputFile(path, "tokenizer"));
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = FromJson(text);
  if (!tokenizer.ok())
    return absl::Status(tokenizer.status().code(), absl::StrCat(path, ": ", tokenizer.status().message()));
  return tokenizer;
}

}  // namespace kvplan
