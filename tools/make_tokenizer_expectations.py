"""Writes tests/loader/data/tokenizer_expectations.json: ids that Hugging Face `tokenizers` produces for a fixed set of
texts, for the fixture's byte-level BPE tokenizer and for two SentencePiece-style byte-fallback tokenizers that
this script trains on the calibration sample (written to tests/loader/data/ too). Run where `tokenizers` is installed:
    python3 tools/make_tokenizer_expectations.py SHARED_DIR tests/loader/data
"""
import json
import sys

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

shared, out = sys.argv[1], sys.argv[2]
calib = open(f"{shared}/data/calib-sample.txt", encoding="utf-8").read()
heldout = open(f"{shared}/data/heldout-git-docs.txt", encoding="utf-8").read()
docs = [d.strip("\n") for d in heldout.split("\n<|doc|>\n")]

texts = [
    "", "a", " ", "  leading spaces", "trailing  ", "Hello, world!", "don't I'm we'll they've you'd",
    "numbers 1 12 123 1234 12345 3.14159", "tabs\tand\nnewlines\n\n\n  indented",
    "unicode: café naïve Ünïcödé 日本語のテキスト 中文 한국어 emoji 🤖🚀 ‽",
    "<|begin_of_text|>special in text<|end_of_text|> after", "x" * 300, "a" + " " * 17 + "b",
    "mixed CASE Words AND 'Quotes' \"double\"", "\r\nwindows\r\nline endings\r\n",
] + [d[:3000] for d in docs[:6]]

sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                              limit_alphabet=80)
sp.train_from_iterator([calib], trainer=trainer)
sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)])
sp.save(f"{out}/sp_metaspace_tokenizer.json")

# Llama 2 layout: the normalizer prepends and replaces spaces; no pre-tokenizer.
llama2 = json.loads(sp.to_str())
llama2["pre_tokenizer"] = None
llama2["normalizer"] = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
open(f"{out}/sp_llama2_tokenizer.json", "w", encoding="utf-8").write(json.dumps(llama2, ensure_ascii=False))

expectations = {}
for name, path in [("llama-dev-6m", f"{shared}/models/llama-dev-6m/tokenizer.json"),
                   ("sp_metaspace", f"{out}/sp_metaspace_tokenizer.json"),
                   ("sp_llama2", f"{out}/sp_llama2_tokenizer.json")]:
    tok = Tokenizer.from_file(path)
    expectations[name] = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids,
                           "decoded": tok.decode(tok.encode(t, add_special_tokens=False).ids,
                                                 skip_special_tokens=False)} for t in texts]
json.dump(expectations, open(f"{out}/tokenizer_expectations.json", "w", encoding="utf-8"), ensure_ascii=False)
print("wrote", {k: len(v) for k, v in expectations.items()})
