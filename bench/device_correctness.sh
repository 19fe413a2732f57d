# Kernel and runtime tests on the GPU, tokenizer expectations from HF tokenizers, full-cache quality on the
# GPU runtime, and the same protocols replayed in transformers.
source bench/device_setup.sh
nvidia-smi -L
/tmp/kv/bin/cuda_kernels_test 2>&1 | tee $OUT/cuda_kernels_test.log | tail -25
/tmp/kv/bin/cuda_model_test 2>&1 | tee $OUT/cuda_model_test.log | tail -8
mkdir -p $OUT/tok && python3 tools/make_tokenizer_expectations.py /tmp/kv/shared $OUT/tok
/tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT --device cuda --json $OUT/eval_cuda.json \
  --needle-prompts /tmp/needle_prompts.json 2>&1 | tr '\r' '\n' | grep -v '\[' | tee $OUT/eval_cuda.log
python3 bench/hf_reference.py correctness $MODEL $HELDOUT 2>&1 | grep -v Warning | tee $OUT/hf_correctness.log
python3 bench/hf_reference.py needle $MODEL /tmp/needle_prompts.json 2>&1 | tail -2 | tee $OUT/hf_needle.log
