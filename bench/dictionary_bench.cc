// Dictionary training on the CPU (LearnDictionary) against the GPU (LearnDictionaryOnDevice) on synthetic
// key-like vectors (tests/testing/sparse_mixture.h): seconds per dictionary and the held-back relative error of each.
//   build-attn/bench/dictionary_bench n,dim,atoms,sparsity,epochs ...
// The GPU trainer runs twice: the first run also pays for the CUDA context and cuBLAS's start-up, once per process.
#include <chrono>
#include <cstdio>
#include <vector>

#include "calibrate/dictionary_learning.h"
#include "tests/testing/sparse_mixture.h"

namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("%8s %4s %6s %3s %3s | %9s %9s %9s | %8s %8s\n", "n", "dim", "atoms", "s", "ep", "cpu s", "gpu 1st s",
              "gpu s", "cpu err", "gpu err");
  for (int i = 1; i < argc; ++i) {
    int n, dim, atoms, sparsity, epochs;
    if (std::sscanf(argv[i], "%d,%d,%d,%d,%d", &n, &dim, &atoms, &sparsity, &epochs) != 5) {
      std::fprintf(stderr, "expected n,dim,atoms,sparsity,epochs, got %s\n", argv[i]);
      return 2;
    }
    const std::vector<float> samples = kvplan::testing::SparseMixtureVectors(n, dim, {.hidden_atoms = 4 * atoms});
    auto start = std::chrono::steady_clock::now();
    const kvplan::plan::Dictionary cpu = kvplan::LearnDictionary(samples, dim, atoms, sparsity, epochs);
    const double cpu_seconds = SecondsSince(start);
    double gpu_seconds[2];
    float gpu_error = 0;
    for (double& seconds : gpu_seconds) {
      start = std::chrono::steady_clock::now();
      const auto gpu = kvplan::LearnDictionaryOnDevice(samples, dim, atoms, sparsity, epochs);
      seconds = SecondsSince(start);
      if (!gpu.ok()) {
        std::fprintf(stderr, "%s\n", gpu.status().ToString().c_str());
        return 1;
      }
      gpu_error = gpu->relative_error();
    }
    std::printf("%8d %4d %6d %3d %3d | %9.3f %9.3f %9.3f | %8.4f %8.4f\n", n, dim, atoms, sparsity, epochs, cpu_seconds,
                gpu_seconds[0], gpu_seconds[1], cpu.relative_error(), gpu_error);
    std::fflush(stdout);
  }
  return 0;
}
