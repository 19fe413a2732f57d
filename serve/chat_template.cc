#include "serve/chat_template.h"

#include <algorithm>
#include <cctype>
#include <map>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvplan {
namespace {

// Templates come from model files: expressions and blocks nest no deeper than this, so parsing never recurses
// far, and output stops growing at kMaxOutputBytes.
constexpr int kMaxNesting = 64;
constexpr size_t kMaxOutputBytes = size_t(64) << 20;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kString, kList, kMap };
  using List = std::vector<Value>;
  using Map = std::map<std::string, Value>;

  Kind kind = Kind::kUndefined;
  bool boolean = false;
  int64_t integer = 0;
  std::string text;
  std::shared_ptr<const List> list;
  std::shared_ptr<const Map> map;

  static Value None() { return {.kind = Kind::kNone}; }
  static Value Bool(bool b) { return {.kind = Kind::kBool, .boolean = b}; }
  static Value Int(int64_t i) { return {.kind = Kind::kInt, .integer = i}; }
  static Value String(std::string s) { return {.kind = Kind::kString, .text = std::move(s)}; }
  static Value Of(List l) { return {.kind = Kind::kList, .list = std::make_shared<const List>(std::move(l))}; }
  static Value Of(Map m) { return {.kind = Kind::kMap, .map = std::make_shared<const Map>(std::move(m))}; }

  bool Truthy() const {
    switch (kind) {
      case Kind::kUndefined:
      case Kind::kNone: return false;
      case Kind::kBool: return boolean;
      case Kind::kInt: return integer != 0;
      case Kind::kString: return !text.empty();
      case Kind::kList: return !list->empty();
      case Kind::kMap: return !map->empty();
    }
    return false;
  }
};

const char* KindName(Value::Kind kind) {
  constexpr const char* kNames[] = {"undefined", "none", "boolean", "integer", "string", "list", "mapping"};
  return kNames[int(kind)];
}

bool Equal(const Value& a, const Value& b) {
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return true;
    case Value::Kind::kBool: return a.boolean == b.boolean;
    case Value::Kind::kInt: return a.integer == b.integer;
    case Value::Kind::kString: return a.text == b.text;
    case Value::Kind::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i)
        if (!Equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    case Value::Kind::kMap:
      if (a.map->size() != b.map->size()) return false;
      for (const auto& [key, value] : *a.map) {
        auto found = b.map->find(key);
        if (found == b.map->end() || !Equal(value, found->second)) return false;
      }
      return true;
  }
  return false;
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// ---------------------------------------------------------------------------------------------------------------
// Expressions

struct Expr {
  enum class Kind { kLiteral, kName, kAttribute, kSubscript, kFilter, kTest, kCall, kUnary, kBinary, kIfElse, kList };
  Kind kind;
  size_t offset = 0;
  std::string name;  // name, attribute, filter, test, function or operator
  Value literal;
  bool negated = false;  // `is not`
  std::vector<std::unique_ptr<Expr>> operands;
};

struct Token {
  enum class Kind { kName, kString, kInt, kOperator, kEnd };
  Kind kind;
  std::string text;
  size_t offset;
};

absl::Status ErrorAt(size_t offset, std::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("chat template, offset ", offset, ": ", std::string(message)));
}

// Splits a tag's contents (starting at `base` in the template) into tokens.
absl::StatusOr<std::vector<Token>> Tokenize(std::string_view source, size_t base) {
  static constexpr std::string_view kOperators[] = {"==", "!=", "<=", ">=", "//", "**", "<", ">", "+",
                                                    "-",  "*",  "/",  "%",  "~",  "(",  ")", "[", "]",
                                                    ".",  ",",  "|",  ":",  "=",  "{",  "}"};
  std::vector<Token> tokens;
  size_t i = 0;
  while (i < source.size()) {
    const char c = source[i];
    const size_t offset = base + i;
    if (IsSpace(c)) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t end = i;
      while (end < source.size() && (std::isalnum(static_cast<unsigned char>(source[end])) || source[end] == '_'))
        ++end;
      tokens.push_back({Token::Kind::kName, std::string(source.substr(i, end - i)), offset});
      i = end;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t end = i;
      while (end < source.size() && std::isdigit(static_cast<unsigned char>(source[end]))) ++end;
      if (end < source.size() && source[end] == '.' && end + 1 < source.size() &&
          std::isdigit(static_cast<unsigned char>(source[end + 1])))
        return ErrorAt(offset, "floating-point numbers are not supported");
      if (end - i > 18) return ErrorAt(offset, "integer literal too large");
      tokens.push_back({Token::Kind::kInt, std::string(source.substr(i, end - i)), offset});
      i = end;
    } else if (c == '\'' || c == '"') {
      std::string text;
      size_t end = i + 1;
      for (; end < source.size() && source[end] != c; ++end) {
        if (source[end] != '\\' || end + 1 == source.size()) {
          text += source[end];
          continue;
        }
        const char escaped = source[++end];
        switch (escaped) {
          case 'n': text += '\n'; break;
          case 't': text += '\t'; break;
          case 'r': text += '\r'; break;
          case '\\':
          case '\'':
          case '"': text += escaped; break;
          default: text += '\\'; text += escaped;
        }
      }
      if (end == source.size()) return ErrorAt(offset, "unterminated string literal");
      tokens.push_back({Token::Kind::kString, std::move(text), offset});
      i = end + 1;
    } else {
      bool matched = false;
      for (std::string_view op : kOperators) {
        if (source.substr(i, op.size()) != op) continue;
        tokens.push_back({Token::Kind::kOperator, std::string(op), offset});
        i += op.size();
        matched = true;
        break;
      }
      if (!matched) return ErrorAt(offset, absl::StrCat("unexpected character '", std::string(1, c), "'"));
    }
  }
  tokens.push_back({Token::Kind::kEnd, "", base + source.size()});
  return tokens;
}

// Recursive descent over one tag's tokens, with Jinja's precedence: conditional < or < and < not < comparisons
// < + - < ~ < * // % < unary < filters, tests and postfix.
class ExpressionParser {
 public:
  explicit ExpressionParser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  const Token& Peek() const { return tokens_[position_]; }
  bool AtEnd() const { return Peek().kind == Token::Kind::kEnd; }
  bool IsOperator(std::string_view op) const { return Peek().kind == Token::Kind::kOperator && Peek().text == op; }
  bool IsKeyword(std::string_view word) const { return Peek().kind == Token::Kind::kName && Peek().text == word; }
  bool IsKeywordAt(size_t ahead, std::string_view word) const {
    const size_t at = std::min(position_ + ahead, tokens_.size() - 1);
    return tokens_[at].kind == Token::Kind::kName && tokens_[at].text == word;
  }
  Token Next() { return AtEnd() ? Peek() : tokens_[position_++]; }

  absl::Status Expect(std::string_view op) {
    if (!IsOperator(op))
      return ErrorAt(Peek().offset, absl::StrCat("expected '", std::string(op), "', found ", Describe(Peek())));
    ++position_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Token::Kind::kName)
      return ErrorAt(Peek().offset, absl::StrCat("expected a name, found ", Describe(Peek())));
    return Next().text;
  }
  absl::Status ExpectEnd() {
    if (!AtEnd()) return ErrorAt(Peek().offset, absl::StrCat("unexpected ", Describe(Peek())));
    return absl::OkStatus();
  }

  static std::string Describe(const Token& token) {
    return token.kind == Token::Kind::kEnd ? "end of tag" : absl::StrCat("'", token.text, "'");
  }

  absl::StatusOr<std::unique_ptr<Expr>> Parse() { return Conditional(0); }

 private:
  using ExprOr = absl::StatusOr<std::unique_ptr<Expr>>;

  static std::unique_ptr<Expr> Make(Expr::Kind kind, size_t offset, std::string name = "") {
    auto expr = std::make_unique<Expr>();
    expr->kind = kind;
    expr->offset = offset;
    expr->name = std::move(name);
    return expr;
  }
  static std::unique_ptr<Expr> Binary(std::string op, size_t offset, std::unique_ptr<Expr> a, std::unique_ptr<Expr> b) {
    auto expr = Make(Expr::Kind::kBinary, offset, std::move(op));
    expr->operands.push_back(std::move(a));
    expr->operands.push_back(std::move(b));
    return expr;
  }
  absl::Status Deeper(int depth) const {
    if (depth > kMaxNesting) return ErrorAt(Peek().offset, absl::StrCat("expression nested deeper than ", kMaxNesting));
    return absl::OkStatus();
  }

  ExprOr Conditional(int depth) {
    KVPLAN_RETURN_IF_ERROR(Deeper(depth));
    KVPLAN_ASSIGN_OR_RETURN(auto value, Or(depth));
    if (!IsKeyword("if")) return value;
    const size_t offset = Next().offset;
    KVPLAN_ASSIGN_OR_RETURN(auto condition, Or(depth));
    auto expr = Make(Expr::Kind::kIfElse, offset);
    std::unique_ptr<Expr> otherwise = Make(Expr::Kind::kLiteral, offset);  // no else: undefined
    if (IsKeyword("else")) {
      Next();
      KVPLAN_ASSIGN_OR_RETURN(otherwise, Conditional(depth + 1));
    }
    expr->operands.push_back(std::move(condition));
    expr->operands.push_back(std::move(value));
    expr->operands.push_back(std::move(otherwise));
    return expr;
  }

  ExprOr Or(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, And(depth));
    while (IsKeyword("or")) {
      const size_t offset = Next().offset;
      KVPLAN_ASSIGN_OR_RETURN(auto right, And(depth));
      left = Binary("or", offset, std::move(left), std::move(right));
    }
    return left;
  }

  ExprOr And(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, Not(depth));
    while (IsKeyword("and")) {
      const size_t offset = Next().offset;
      KVPLAN_ASSIGN_OR_RETURN(auto right, Not(depth));
      left = Binary("and", offset, std::move(left), std::move(right));
    }
    return left;
  }

  ExprOr Not(int depth) {
    KVPLAN_RETURN_IF_ERROR(Deeper(depth));
    if (!IsKeyword("not")) return Compare(depth);
    const size_t offset = Next().offset;
    KVPLAN_ASSIGN_OR_RETURN(auto operand, Not(depth + 1));
    auto expr = Make(Expr::Kind::kUnary, offset, "not");
    expr->operands.push_back(std::move(operand));
    return expr;
  }

  ExprOr Compare(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, Sum(depth));
    while (true) {
      std::string op;
      if (Peek().kind == Token::Kind::kOperator && (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
                                                    Peek().text == ">" || Peek().text == "<=" || Peek().text == ">=")) {
        op = Peek().text;
      } else if (IsKeyword("in")) {
        op = "in";
      } else if (IsKeyword("not") && IsKeywordAt(1, "in")) {
        Next();
        op = "not in";
      } else {
        return left;
      }
      const size_t offset = Next().offset;
      KVPLAN_ASSIGN_OR_RETURN(auto right, Sum(depth));
      left = Binary(op, offset, std::move(left), std::move(right));
    }
  }

  ExprOr Sum(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, Concat(depth));
    while (IsOperator("+") || IsOperator("-")) {
      const Token op = Next();
      KVPLAN_ASSIGN_OR_RETURN(auto right, Concat(depth));
      left = Binary(op.text, op.offset, std::move(left), std::move(right));
    }
    return left;
  }

  ExprOr Concat(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, Product(depth));
    while (IsOperator("~")) {
      const size_t offset = Next().offset;
      KVPLAN_ASSIGN_OR_RETURN(auto right, Product(depth));
      left = Binary("~", offset, std::move(left), std::move(right));
    }
    return left;
  }

  ExprOr Product(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto left, Unary(depth));
    while (IsOperator("*") || IsOperator("//") || IsOperator("%") || IsOperator("/") || IsOperator("**")) {
      const Token op = Next();
      if (op.text == "/" || op.text == "**")
        return ErrorAt(op.offset, absl::StrCat("the operator '", op.text, "' is not supported"));
      KVPLAN_ASSIGN_OR_RETURN(auto right, Unary(depth));
      left = Binary(op.text, op.offset, std::move(left), std::move(right));
    }
    return left;
  }

  ExprOr Unary(int depth) {
    KVPLAN_RETURN_IF_ERROR(Deeper(depth));
    if (IsOperator("-") || IsOperator("+")) {
      const Token op = Next();
      KVPLAN_ASSIGN_OR_RETURN(auto operand, Unary(depth + 1));
      if (op.text == "+") return operand;
      auto expr = Make(Expr::Kind::kUnary, op.offset, "-");
      expr->operands.push_back(std::move(operand));
      return expr;
    }
    KVPLAN_ASSIGN_OR_RETURN(auto value, Postfix(depth));
    while (IsOperator("|") || IsKeyword("is")) {
      const Token op = Next();
      const bool negated = op.text == "is" && IsKeyword("not");
      if (negated) Next();
      const Token name = Peek();
      KVPLAN_ASSIGN_OR_RETURN(std::string function, ExpectName());
      if (IsOperator("("))
        return ErrorAt(Peek().offset, absl::StrCat(op.text == "is" ? "test '" : "filter '", function,
                                                   "' with arguments is not supported"));
      if (op.text == "|" && function != "trim" && function != "length")
        return ErrorAt(name.offset, absl::StrCat("unsupported filter '", function, "' (supported: trim, length)"));
      if (op.text == "is" && function != "defined" && function != "undefined" && function != "none" &&
          function != "string" && function != "number")
        return ErrorAt(name.offset, absl::StrCat("unsupported test '", function,
                                                 "' (supported: defined, undefined, none, string, number)"));
      auto expr = Make(op.text == "|" ? Expr::Kind::kFilter : Expr::Kind::kTest, name.offset, function);
      expr->negated = negated;
      expr->operands.push_back(std::move(value));
      value = std::move(expr);
    }
    return value;
  }

  ExprOr Postfix(int depth) {
    KVPLAN_ASSIGN_OR_RETURN(auto value, Primary(depth));
    while (true) {
      if (IsOperator(".")) {
        Next();
        const size_t offset = Peek().offset;
        KVPLAN_ASSIGN_OR_RETURN(std::string attribute, ExpectName());
        if (IsOperator("(")) return ErrorAt(offset, absl::StrCat("method call '", attribute, "()' is not supported"));
        auto expr = Make(Expr::Kind::kAttribute, offset, attribute);
        expr->operands.push_back(std::move(value));
        value = std::move(expr);
      } else if (IsOperator("[")) {
        const size_t offset = Next().offset;
        if (IsOperator(":")) return ErrorAt(Peek().offset, "slices are not supported");
        KVPLAN_ASSIGN_OR_RETURN(auto index, Conditional(depth + 1));
        if (IsOperator(":")) return ErrorAt(Peek().offset, "slices are not supported");
        KVPLAN_RETURN_IF_ERROR(Expect("]"));
        auto expr = Make(Expr::Kind::kSubscript, offset);
        expr->operands.push_back(std::move(value));
        expr->operands.push_back(std::move(index));
        value = std::move(expr);
      } else if (IsOperator("(")) {
        if (value->kind != Expr::Kind::kName || value->name != "raise_exception")
          return ErrorAt(value->offset,
                         value->kind == Expr::Kind::kName
                             ? absl::StrCat("unsupported function '", value->name, "' (supported: raise_exception)")
                             : std::string("calling this value is not supported"));
        Next();
        auto call = Make(Expr::Kind::kCall, value->offset, value->name);
        while (!IsOperator(")")) {
          KVPLAN_ASSIGN_OR_RETURN(auto argument, Conditional(depth + 1));
          call->operands.push_back(std::move(argument));
          if (!IsOperator(")")) KVPLAN_RETURN_IF_ERROR(Expect(","));
        }
        Next();
        value = std::move(call);
      } else {
        return value;
      }
    }
  }

  ExprOr Primary(int depth) {
    const Token token = Peek();
    switch (token.kind) {
      case Token::Kind::kString: {
        Next();
        auto expr = Make(Expr::Kind::kLiteral, token.offset);
        expr->literal = Value::String(token.text);
        // Adjacent string literals concatenate, as in Python.
        while (Peek().kind == Token::Kind::kString) expr->literal.text += Next().text;
        return expr;
      }
      case Token::Kind::kInt: {
        Next();
        auto expr = Make(Expr::Kind::kLiteral, token.offset);
        expr->literal = Value::Int(std::stoll(token.text));
        return expr;
      }
      case Token::Kind::kName: {
        Next();
        auto expr = Make(Expr::Kind::kLiteral, token.offset);
        if (token.text == "true" || token.text == "True") {
          expr->literal = Value::Bool(true);
        } else if (token.text == "false" || token.text == "False") {
          expr->literal = Value::Bool(false);
        } else if (token.text == "none" || token.text == "None") {
          expr->literal = Value::None();
        } else {
          expr->kind = Expr::Kind::kName;
          expr->name = token.text;
        }
        return expr;
      }
      case Token::Kind::kOperator:
        if (token.text == "(") {
          Next();
          KVPLAN_ASSIGN_OR_RETURN(auto inner, Conditional(depth + 1));
          if (IsOperator(",")) return ErrorAt(Peek().offset, "tuples are not supported");
          KVPLAN_RETURN_IF_ERROR(Expect(")"));
          return inner;
        }
        if (token.text == "[") {
          Next();
          auto list = Make(Expr::Kind::kList, token.offset);
          while (!IsOperator("]")) {
            KVPLAN_ASSIGN_OR_RETURN(auto item, Conditional(depth + 1));
            list->operands.push_back(std::move(item));
            if (!IsOperator("]")) KVPLAN_RETURN_IF_ERROR(Expect(","));
          }
          Next();
          return list;
        }
        if (token.text == "{") return ErrorAt(token.offset, "dictionary literals are not supported");
        break;
      case Token::Kind::kEnd: break;
    }
    return ErrorAt(token.offset, absl::StrCat("expected a value, found ", Describe(token)));
  }

  std::vector<Token> tokens_;
  size_t position_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Statements

struct ChatTemplate::Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet };
  Kind kind;
  std::string text;  // text; the loop variable; the name set
  std::vector<std::unique_ptr<Expr>>
      expressions;                        // output / set: the value; if: one condition per branch; for: the iterable
  std::vector<std::vector<Node>> bodies;  // if: one per branch, then else's; for: the body
};

namespace {

using Node = ChatTemplate::Node;

// The template cut at its tags, with trim_blocks, lstrip_blocks and whitespace control applied to the text.
struct Segment {
  enum class Kind { kText, kExpression, kStatement };
  Kind kind;
  std::string text;   // text, or the tag's contents
  size_t offset = 0;  // of the contents in the template
};

bool OpensTag(char c) { return c == '{' || c == '%' || c == '#'; }

absl::StatusOr<std::vector<Segment>> Segments(std::string_view source) {
  std::vector<Segment> segments;
  bool strip_next_whitespace = false, trim_next_newline = false;
  size_t position = 0;
  while (true) {
    size_t open = position;
    while ((open = source.find('{', open)) != std::string_view::npos &&
           (open + 1 == source.size() || !OpensTag(source[open + 1])))
      ++open;
    const size_t text_end = open == std::string_view::npos ? source.size() : open;
    std::string text(source.substr(position, text_end - position));
    // Whether the text begins a line (Jinja's lexer counts the newline trim_blocks removes as before it).
    bool line_starting = position == 0 || source[position - 1] == '\n';
    if (strip_next_whitespace) {
      text.erase(0, std::find_if(text.begin(), text.end(), [](char c) { return !IsSpace(c); }) - text.begin());
    } else if (trim_next_newline && (text.starts_with("\n") || text.starts_with("\r\n"))) {
      text.erase(0, text.find('\n') + 1);
      line_starting = true;
    }
    if (open == std::string_view::npos) {
      if (!text.empty()) segments.push_back({Segment::Kind::kText, std::move(text), position});
      return segments;
    }
    const char type = source[open + 1];
    const std::string_view close = type == '{' ? "}}" : type == '%' ? "%}" : "#}";
    size_t contents = open + 2;
    const bool strip_before = contents < source.size() && source[contents] == '-';
    const bool keep_before = contents < source.size() && source[contents] == '+';
    if (strip_before || keep_before) ++contents;
    const size_t close_at = source.find(close, contents);
    if (close_at == std::string_view::npos)
      return ErrorAt(open, absl::StrCat("tag '", std::string(source.substr(open, 2)), "' is never closed"));
    size_t contents_end = close_at;
    const bool strip_after = contents_end > contents && source[contents_end - 1] == '-';
    if (strip_after) --contents_end;

    if (strip_before) {
      text.erase(std::find_if(text.rbegin(), text.rend(), [](char c) { return !IsSpace(c); }).base(), text.end());
    } else if (type != '{' && !keep_before) {
      // lstrip_blocks: spaces and tabs between the start of a line and a block or comment tag go.
      const size_t newline = text.rfind('\n');
      const size_t line_start = newline == std::string::npos ? 0 : newline + 1;
      if ((line_start > 0 || line_starting) &&
          std::all_of(text.begin() + line_start, text.end(), [](char c) { return c == ' ' || c == '\t'; }))
        text.erase(line_start);
    }
    if (!text.empty()) segments.push_back({Segment::Kind::kText, std::move(text), position});
    if (type != '#')
      segments.push_back({type == '{' ? Segment::Kind::kExpression : Segment::Kind::kStatement,
                          std::string(source.substr(contents, contents_end - contents)), contents});
    strip_next_whitespace = strip_after;
    trim_next_newline = !strip_after && type != '{';  // trim_blocks
    position = close_at + 2;
  }
}

// Builds the node tree from the segments, block by block.
class StatementParser {
 public:
  explicit StatementParser(std::vector<Segment> segments) : segments_(std::move(segments)) {}

  absl::StatusOr<std::vector<Node>> ParseAll() {
    std::string end_tag;
    KVPLAN_ASSIGN_OR_RETURN(std::vector<Node> body, Body({}, 0, end_tag));
    return body;
  }

 private:
  // Nodes up to one of `ends` (its keyword goes to `found`), or the end of the template when `ends` is empty.
  absl::StatusOr<std::vector<Node>> Body(const std::vector<std::string>& ends, int depth, std::string& found) {
    if (depth > kMaxNesting)
      return ErrorAt(next_ < segments_.size() ? segments_[next_].offset : 0,
                     absl::StrCat("blocks nested deeper than ", kMaxNesting));
    std::vector<Node> nodes;
    while (next_ < segments_.size()) {
      const Segment& segment = segments_[next_++];
      if (segment.kind == Segment::Kind::kText) {
        nodes.push_back({.kind = Node::Kind::kText, .text = segment.text});
        continue;
      }
      KVPLAN_ASSIGN_OR_RETURN(std::vector<Token> tokens, Tokenize(segment.text, segment.offset));
      ExpressionParser parser(std::move(tokens));
      if (segment.kind == Segment::Kind::kExpression) {
        Node node{.kind = Node::Kind::kOutput};
        KVPLAN_ASSIGN_OR_RETURN(auto value, parser.Parse());
        KVPLAN_RETURN_IF_ERROR(parser.ExpectEnd());
        node.expressions.push_back(std::move(value));
        nodes.push_back(std::move(node));
        continue;
      }
      if (parser.Peek().kind != Token::Kind::kName) return ErrorAt(segment.offset, "expected a statement keyword");
      const Token keyword = parser.Next();
      if (std::find(ends.begin(), ends.end(), keyword.text) != ends.end()) {
        found = keyword.text;
        --next_;  // the caller reads the tag again for its condition
        return nodes;
      }
      if (keyword.text == "if") {
        KVPLAN_ASSIGN_OR_RETURN(Node node, If(parser, depth));
        nodes.push_back(std::move(node));
      } else if (keyword.text == "for") {
        KVPLAN_ASSIGN_OR_RETURN(Node node, For(parser, depth));
        nodes.push_back(std::move(node));
      } else if (keyword.text == "set") {
        KVPLAN_ASSIGN_OR_RETURN(std::string name, parser.ExpectName());
        if (parser.IsOperator("."))
          return ErrorAt(parser.Peek().offset, "setting an attribute (namespace objects) is not supported");
        if (parser.IsOperator(","))
          return ErrorAt(parser.Peek().offset, "setting several names at once is not supported");
        if (parser.AtEnd()) return ErrorAt(keyword.offset, "block '{% set %}' is not supported");
        KVPLAN_RETURN_IF_ERROR(parser.Expect("="));
        KVPLAN_ASSIGN_OR_RETURN(auto value, parser.Parse());
        KVPLAN_RETURN_IF_ERROR(parser.ExpectEnd());
        Node node{.kind = Node::Kind::kSet, .text = name};
        node.expressions.push_back(std::move(value));
        nodes.push_back(std::move(node));
      } else if (keyword.text == "elif" || keyword.text == "else" || keyword.text == "endif" ||
                 keyword.text == "endfor") {
        return ErrorAt(keyword.offset, absl::StrCat("'", keyword.text, "' outside the block it belongs to"));
      } else {
        return ErrorAt(keyword.offset, absl::StrCat("unsupported tag '{% ", keyword.text,
                                                    " %}' (supported: for, if, elif, else, set)"));
      }
    }
    if (!ends.empty())
      return ErrorAt(segments_.empty() ? 0 : segments_.back().offset,
                     absl::StrCat("missing '{% ", ends.back(), " %}' at the end of the template"));
    return nodes;
  }

  // The statement tag Body stopped at, tokenised past its keyword.
  absl::StatusOr<ExpressionParser> ReopenEndTag() {
    const Segment& segment = segments_[next_++];
    KVPLAN_ASSIGN_OR_RETURN(std::vector<Token> tokens, Tokenize(segment.text, segment.offset));
    ExpressionParser parser(std::move(tokens));
    parser.Next();
    return parser;
  }

  absl::StatusOr<Node> If(ExpressionParser& parser, int depth) {
    Node node{.kind = Node::Kind::kIf};
    KVPLAN_ASSIGN_OR_RETURN(auto condition, parser.Parse());
    KVPLAN_RETURN_IF_ERROR(parser.ExpectEnd());
    node.expressions.push_back(std::move(condition));
    while (true) {
      std::string found;
      KVPLAN_ASSIGN_OR_RETURN(std::vector<Node> body, Body({"elif", "else", "endif"}, depth + 1, found));
      node.bodies.push_back(std::move(body));
      KVPLAN_ASSIGN_OR_RETURN(ExpressionParser end, ReopenEndTag());
      if (found == "endif") {
        KVPLAN_RETURN_IF_ERROR(end.ExpectEnd());
        return node;
      }
      if (found == "elif") {
        KVPLAN_ASSIGN_OR_RETURN(auto branch, end.Parse());
        KVPLAN_RETURN_IF_ERROR(end.ExpectEnd());
        node.expressions.push_back(std::move(branch));
        continue;
      }
      KVPLAN_RETURN_IF_ERROR(end.ExpectEnd());  // else: the last body, then endif
      KVPLAN_ASSIGN_OR_RETURN(std::vector<Node> otherwise, Body({"endif"}, depth + 1, found));
      node.bodies.push_back(std::move(otherwise));
      KVPLAN_ASSIGN_OR_RETURN(ExpressionParser endif, ReopenEndTag());
      KVPLAN_RETURN_IF_ERROR(endif.ExpectEnd());
      return node;
    }
  }

  absl::StatusOr<Node> For(ExpressionParser& parser, int depth) {
    KVPLAN_ASSIGN_OR_RETURN(std::string variable, parser.ExpectName());
    if (parser.IsOperator(","))
      return ErrorAt(parser.Peek().offset, "unpacking several loop variables is not supported");
    if (!parser.IsKeyword("in")) return ErrorAt(parser.Peek().offset, "expected 'in' after the loop variable");
    parser.Next();
    KVPLAN_ASSIGN_OR_RETURN(auto iterable, parser.Parse());
    if (parser.IsKeyword("recursive")) return ErrorAt(parser.Peek().offset, "recursive loops are not supported");
    KVPLAN_RETURN_IF_ERROR(parser.ExpectEnd());
    Node node{.kind = Node::Kind::kFor, .text = variable};
    node.expressions.push_back(std::move(iterable));
    std::string found;
    KVPLAN_ASSIGN_OR_RETURN(std::vector<Node> body, Body({"else", "endfor"}, depth + 1, found));
    KVPLAN_ASSIGN_OR_RETURN(ExpressionParser end, ReopenEndTag());
    if (found == "else") return ErrorAt(end.Peek().offset, "'{% else %}' in a for loop is not supported");
    KVPLAN_RETURN_IF_ERROR(end.ExpectEnd());
    node.bodies.push_back(std::move(body));
    return node;
  }

  std::vector<Segment> segments_;
  size_t next_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Rendering

class Renderer {
 public:
  explicit Renderer(Value::Map globals) { scopes_.push_back(std::move(globals)); }

  absl::Status Run(const std::vector<Node>& nodes) {
    for (const Node& node : nodes) KVPLAN_RETURN_IF_ERROR(Run(node));
    return absl::OkStatus();
  }

  std::string& output() { return output_; }

 private:
  absl::Status Run(const Node& node) {
    switch (node.kind) {
      case Node::Kind::kText: return Write(node.text);
      case Node::Kind::kOutput: {
        KVPLAN_ASSIGN_OR_RETURN(Value value, Evaluate(*node.expressions[0]));
        KVPLAN_ASSIGN_OR_RETURN(std::string text, Text(value, node.expressions[0]->offset));
        return Write(text);
      }
      case Node::Kind::kSet: {
        KVPLAN_ASSIGN_OR_RETURN(Value value, Evaluate(*node.expressions[0]));
        scopes_.back()[node.text] = std::move(value);
        return absl::OkStatus();
      }
      case Node::Kind::kIf:
        for (size_t branch = 0; branch < node.bodies.size(); ++branch) {
          if (branch < node.expressions.size()) {
            KVPLAN_ASSIGN_OR_RETURN(Value condition, Evaluate(*node.expressions[branch]));
            if (!condition.Truthy()) continue;
          }
          return Run(node.bodies[branch]);
        }
        return absl::OkStatus();
      case Node::Kind::kFor: {
        KVPLAN_ASSIGN_OR_RETURN(Value iterable, Evaluate(*node.expressions[0]));
        std::vector<Value> items;
        if (iterable.kind == Value::Kind::kList) {
          items = *iterable.list;
        } else if (iterable.kind == Value::Kind::kMap) {
          for (const auto& [key, value] : *iterable.map) items.push_back(Value::String(key));
        } else if (iterable.kind != Value::Kind::kUndefined && iterable.kind != Value::Kind::kNone) {
          return ErrorAt(node.expressions[0]->offset, absl::StrCat("cannot loop over a ", KindName(iterable.kind)));
        }
        const int64_t length = int64_t(items.size());
        for (int64_t i = 0; i < length; ++i) {
          // Names set inside a loop body stay inside it, as in Jinja.
          scopes_.push_back({{node.text, items[i]},
                             {"loop", Value::Of(Value::Map{{"index", Value::Int(i + 1)},
                                                           {"index0", Value::Int(i)},
                                                           {"revindex", Value::Int(length - i)},
                                                           {"revindex0", Value::Int(length - i - 1)},
                                                           {"first", Value::Bool(i == 0)},
                                                           {"last", Value::Bool(i + 1 == length)},
                                                           {"length", Value::Int(length)}})}});
          const absl::Status status = Run(node.bodies[0]);
          scopes_.pop_back();
          KVPLAN_RETURN_IF_ERROR(status);
        }
        return absl::OkStatus();
      }
    }
    return absl::OkStatus();
  }

  absl::Status Write(std::string_view text) {
    if (output_.size() + text.size() > kMaxOutputBytes)
      return absl::InvalidArgumentError(absl::StrCat("chat template output exceeds ", kMaxOutputBytes, " bytes"));
    output_ += text;
    return absl::OkStatus();
  }

  static absl::StatusOr<std::string> Text(const Value& value, size_t offset) {
    switch (value.kind) {
      case Value::Kind::kUndefined: return std::string();
      case Value::Kind::kNone: return std::string("None");
      case Value::Kind::kBool: return std::string(value.boolean ? "True" : "False");
      case Value::Kind::kInt: return absl::StrCat(value.integer);
      case Value::Kind::kString: return value.text;
      default: return ErrorAt(offset, absl::StrCat("printing a ", KindName(value.kind), " is not supported"));
    }
  }

  Value Lookup(const std::string& name) const {
    for (auto scope = scopes_.rbegin(); scope != scopes_.rend(); ++scope) {
      auto found = scope->find(name);
      if (found != scope->end()) return found->second;
    }
    return Value();
  }

  static Value Member(const Value& container, const Value& key) {
    if (container.kind == Value::Kind::kMap && key.kind == Value::Kind::kString) {
      auto found = container.map->find(key.text);
      return found == container.map->end() ? Value() : found->second;
    }
    if (key.kind == Value::Kind::kInt) {
      int64_t size = 0;
      if (container.kind == Value::Kind::kList) size = int64_t(container.list->size());
      if (container.kind == Value::Kind::kString) size = int64_t(container.text.size());
      const int64_t index = key.integer < 0 ? key.integer + size : key.integer;
      if (index < 0 || index >= size) return Value();
      if (container.kind == Value::Kind::kList) return (*container.list)[index];
      return Value::String(std::string(1, container.text[index]));
    }
    return Value();
  }

  absl::StatusOr<Value> Evaluate(const Expr& expr) {
    switch (expr.kind) {
      case Expr::Kind::kLiteral: return expr.literal;
      case Expr::Kind::kName: return Lookup(expr.name);
      case Expr::Kind::kList: {
        Value::List items;
        for (const auto& operand : expr.operands) {
          KVPLAN_ASSIGN_OR_RETURN(Value item, Evaluate(*operand));
          items.push_back(std::move(item));
        }
        return Value::Of(std::move(items));
      }
      case Expr::Kind::kAttribute: {
        KVPLAN_ASSIGN_OR_RETURN(Value container, Evaluate(*expr.operands[0]));
        return Member(container, Value::String(expr.name));
      }
      case Expr::Kind::kSubscript: {
        KVPLAN_ASSIGN_OR_RETURN(Value container, Evaluate(*expr.operands[0]));
        KVPLAN_ASSIGN_OR_RETURN(Value key, Evaluate(*expr.operands[1]));
        return Member(container, key);
      }
      case Expr::Kind::kFilter: return Filter(expr);
      case Expr::Kind::kTest: {
        KVPLAN_ASSIGN_OR_RETURN(Value value, Evaluate(*expr.operands[0]));
        bool holds = false;
        if (expr.name == "defined") holds = value.kind != Value::Kind::kUndefined;
        if (expr.name == "undefined") holds = value.kind == Value::Kind::kUndefined;
        if (expr.name == "none") holds = value.kind == Value::Kind::kNone;
        if (expr.name == "string") holds = value.kind == Value::Kind::kString;
        if (expr.name == "number") holds = value.kind == Value::Kind::kInt;
        return Value::Bool(holds != expr.negated);
      }
      case Expr::Kind::kCall: {  // raise_exception, the only function
        std::string message;
        for (const auto& operand : expr.operands) {
          KVPLAN_ASSIGN_OR_RETURN(Value argument, Evaluate(*operand));
          KVPLAN_ASSIGN_OR_RETURN(std::string text, Text(argument, operand->offset));
          message += text;
        }
        return absl::InvalidArgumentError(absl::StrCat("chat template: ", message));
      }
      case Expr::Kind::kUnary: {
        KVPLAN_ASSIGN_OR_RETURN(Value operand, Evaluate(*expr.operands[0]));
        if (expr.name == "not") return Value::Bool(!operand.Truthy());
        if (operand.kind != Value::Kind::kInt)
          return ErrorAt(expr.offset, absl::StrCat("cannot negate a ", KindName(operand.kind)));
        return Value::Int(-operand.integer);
      }
      case Expr::Kind::kIfElse: {
        KVPLAN_ASSIGN_OR_RETURN(Value condition, Evaluate(*expr.operands[0]));
        return Evaluate(*expr.operands[condition.Truthy() ? 1 : 2]);
      }
      case Expr::Kind::kBinary: return Binary(expr);
    }
    return Value();
  }

  absl::StatusOr<Value> Filter(const Expr& expr) {
    KVPLAN_ASSIGN_OR_RETURN(Value value, Evaluate(*expr.operands[0]));
    if (expr.name == "trim") {
      if (value.kind != Value::Kind::kString)
        return ErrorAt(expr.offset, absl::StrCat("filter 'trim' needs a string, got a ", KindName(value.kind)));
      const auto first = std::find_if(value.text.begin(), value.text.end(), [](char c) { return !IsSpace(c); });
      const auto last = std::find_if(value.text.rbegin(), value.text.rend(), [](char c) { return !IsSpace(c); });
      return Value::String(first < last.base() ? std::string(first, last.base()) : std::string());
    }
    switch (value.kind) {  // length
      case Value::Kind::kString: {
        // Python counts code points: every byte but UTF-8 continuation bytes.
        int64_t characters = 0;
        for (char c : value.text) characters += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
        return Value::Int(characters);
      }
      case Value::Kind::kList: return Value::Int(int64_t(value.list->size()));
      case Value::Kind::kMap: return Value::Int(int64_t(value.map->size()));
      default: return ErrorAt(expr.offset, absl::StrCat("filter 'length' cannot measure a ", KindName(value.kind)));
    }
  }

  absl::StatusOr<Value> Binary(const Expr& expr) {
    const std::string& op = expr.name;
    KVPLAN_ASSIGN_OR_RETURN(Value a, Evaluate(*expr.operands[0]));
    if (op == "and" && !a.Truthy()) return a;
    if (op == "or" && a.Truthy()) return a;
    KVPLAN_ASSIGN_OR_RETURN(Value b, Evaluate(*expr.operands[1]));
    if (op == "and" || op == "or") return b;
    if (op == "==") return Value::Bool(Equal(a, b));
    if (op == "!=") return Value::Bool(!Equal(a, b));
    if (op == "~") {
      KVPLAN_ASSIGN_OR_RETURN(std::string left, Text(a, expr.offset));
      KVPLAN_ASSIGN_OR_RETURN(std::string right, Text(b, expr.offset));
      return Value::String(left + right);
    }
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.kind == Value::Kind::kString && a.kind == Value::Kind::kString) {
        found = b.text.find(a.text) != std::string::npos;
      } else if (b.kind == Value::Kind::kList) {
        found = std::any_of(b.list->begin(), b.list->end(), [&](const Value& item) { return Equal(item, a); });
      } else if (b.kind == Value::Kind::kMap && a.kind == Value::Kind::kString) {
        found = b.map->count(a.text) > 0;
      } else {
        return ErrorAt(expr.offset,
                       absl::StrCat("cannot test membership of a ", KindName(a.kind), " in a ", KindName(b.kind)));
      }
      return Value::Bool(found != (op == "not in"));
    }
    if (a.kind == Value::Kind::kString && b.kind == Value::Kind::kString) {
      if (op == "+") return Value::String(a.text + b.text);
      if (op == "<") return Value::Bool(a.text < b.text);
      if (op == ">") return Value::Bool(a.text > b.text);
      if (op == "<=") return Value::Bool(a.text <= b.text);
      if (op == ">=") return Value::Bool(a.text >= b.text);
    }
    if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList && op == "+") {
      Value::List joined = *a.list;
      joined.insert(joined.end(), b.list->begin(), b.list->end());
      return Value::Of(std::move(joined));
    }
    if (a.kind == Value::Kind::kInt && b.kind == Value::Kind::kInt) {
      const int64_t x = a.integer, y = b.integer;
      if (op == "<") return Value::Bool(x < y);
      if (op == ">") return Value::Bool(x > y);
      if (op == "<=") return Value::Bool(x <= y);
      if (op == ">=") return Value::Bool(x >= y);
      int64_t result = 0;
      bool overflow = false;
      if (op == "+") overflow = __builtin_add_overflow(x, y, &result);
      if (op == "-") overflow = __builtin_sub_overflow(x, y, &result);
      if (op == "*") overflow = __builtin_mul_overflow(x, y, &result);
      if (op == "//" || op == "%") {
        if (y == 0) return ErrorAt(expr.offset, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) return ErrorAt(expr.offset, "integer overflow");
        // Python floors: the remainder takes the divisor's sign.
        int64_t quotient = x / y, remainder = x % y;
        if (remainder != 0 && ((remainder < 0) != (y < 0))) {
          --quotient;
          remainder += y;
        }
        result = op == "//" ? quotient : remainder;
      }
      if (overflow) return ErrorAt(expr.offset, "integer overflow");
      return Value::Int(result);
    }
    return ErrorAt(expr.offset, absl::StrCat("operator '", op, "' cannot combine a ", KindName(a.kind), " and a ",
                                             KindName(b.kind)));
  }

  std::vector<Value::Map> scopes_;
  std::string output_;
};

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  KVPLAN_ASSIGN_OR_RETURN(std::vector<Segment> segments, Segments(source));
  StatementParser parser(std::move(segments));
  KVPLAN_ASSIGN_OR_RETURN(std::vector<Node> body, parser.ParseAll());
  return ChatTemplate(std::make_shared<const std::vector<Node>>(std::move(body)));
}

absl::StatusOr<std::string> ChatTemplate::Render(const ChatTemplateInputs& inputs) const {
  Value::List messages;
  for (const ChatMessage& message : inputs.messages)
    messages.push_back(
        Value::Of(Value::Map{{"role", Value::String(message.role)}, {"content", Value::String(message.content)}}));
  Renderer renderer({{"messages", Value::Of(std::move(messages))},
                     {"bos_token", Value::String(inputs.bos_token)},
                     {"eos_token", Value::String(inputs.eos_token)},
                     {"add_generation_prompt", Value::Bool(inputs.add_generation_prompt)}});
  KVPLAN_RETURN_IF_ERROR(renderer.Run(*body_));
  return std::move(renderer.output());
}

}  // namespace kvplan
