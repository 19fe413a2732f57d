"""Reference numbers from Hugging Face transformers on the GPU machine, with the same protocols kvplan uses.

    python3 bench/hf_reference.py correctness MODEL_DIR DATA_FILE   # logits vs reference.safetensors, perplexity
    python3 bench/hf_reference.py needle MODEL_DIR PROMPTS_JSON       # greedy answers to kvplan's needle prompts
    python3 bench/hf_reference.py speed llama-3-8b 4096,32768         # decode tokens/s, random bf16 weights
    python3 bench/hf_reference.py prefill llama-3-8b 4096,32768       # one sdpa forward of the prompt, tokens/s
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig


def correctness(model_dir, data_file):
    ref = load_file(f"{model_dir}/reference.safetensors")
    ids = ref["input_ids"].long().cuda()[None]
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            logits = model(ids).logits[0, -8:].float().cpu()
        err = (logits - ref["logits_last8"]).norm() / ref["logits_last8"].norm()
        print(f"hf fp32 tf32={tf32}: relative error vs logits_last8 = {err:.3e}")
    torch.backends.cuda.matmul.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(model_dir)
    # Documents exactly as kvplan splits them: lines "<|doc|>" separate; each document keeps its trailing newline.
    text = open(data_file, encoding="utf-8").read()
    documents, current = [], []
    for line in text.removesuffix("\n").split("\n"):
        if line == "<|doc|>":
            if current:
                documents.append("".join(current))
            current = []
            continue
        current.append(line + "\n")
    if current:
        documents.append("".join(current))
    stream = []
    for d in documents:
        if len(stream) >= 65536:
            break
        stream.append(model.config.bos_token_id)
        stream.extend(tok(d, add_special_tokens=False)["input_ids"])
    stream = stream[:65536]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(len(stream) // 2048):
            x = torch.tensor(stream[w * 2048:(w + 1) * 2048]).cuda()[None]
            logits = model(x).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
            count += 2047
    print(json.dumps({"hf_perplexity_kvplan_protocol": float(torch.exp(torch.tensor(nll / count))), "tokens": count}))


def needle(model_dir, prompts_json):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    trials = json.load(open(prompts_json))
    results = {}
    for t in trials:
        x = torch.tensor(t["ids"]).cuda()[None]
        out = model.generate(x, max_new_tokens=8, do_sample=False)[0, x.shape[1]:]
        answer = tok.decode(out)
        digits = "".join(c if c.isdigit() else " " for c in answer).split()
        ok = bool(digits) and int(digits[0]) == t["key"]
        r = results.setdefault(str(t["length"]), [0, 0])
        r[0] += ok
        r[1] += 1
    print(json.dumps({"hf_needle_kvplan_prompts": {k: v[0] / v[1] for k, v in results.items()}, "counts": results}))


SHAPES = {"llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)}


def copy_rate():
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    print(json.dumps({"device_copy_gb_per_s_read_plus_write": 2 * x.numel() * 4 / seconds / 1e9}))
    del x, y


def speed(shape, contexts):
    copy_rate()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(contexts) + 64)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    for context in contexts:
        x = torch.randint(0, config.vocab_size, (1, context), device="cuda")
        with torch.no_grad():
            out = model(x, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for step in range(40):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        timed = sorted(times[8:])  # the first steps include allocator growth and kernel selection
        step = timed[len(timed) // 2]
        print(json.dumps({"hf_shape": shape, "context": context, "batch": 1, "ms_per_step": step * 1e3,
                          "tokens_per_second": 1 / step}))
        del cache, out
        torch.cuda.empty_cache()


def prefill(shape, contexts):
    """The prompt in one forward, sdpa attention, the cache written and only the last logits kept (logits_to_keep=1),
    as kvplan's prefill does; the median of three after a warm-up."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(contexts) + 64)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    for context in contexts:
        x = torch.randint(0, config.vocab_size, (1, context), device="cuda")
        times = []
        with torch.no_grad():
            for run in range(4):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(x, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                if run > 0:
                    times.append(time.perf_counter() - start)
                del out
        seconds = sorted(times)[1]
        print(json.dumps({"hf_shape": shape, "context": context, "prefill_seconds": seconds,
                          "prefill_tokens_per_second": context / seconds}))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "correctness":
        correctness(sys.argv[2], sys.argv[3])
    elif command == "needle":
        needle(sys.argv[2], sys.argv[3])
    elif command == "prefill":
        prefill(sys.argv[2], [int(c) for c in sys.argv[3].split(",")])
    else:
        speed(sys.argv[2], [int(c) for c in sys.argv[3].split(",")])
