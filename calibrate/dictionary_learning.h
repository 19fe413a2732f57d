// CSR dictionaries: learned from sampled key or value head vectors, so that matching pursuit codes a vector with a
// few atoms.
#pragma once

#include <vector>

#include "plans/kvplan.pb.h"

namespace kvplan {

// Scales every atom ([atoms, dim] rows) to unit length; a dead atom becomes a basis vector.
void NormaliseAtoms(std::vector<float>& dictionary, int dim);

// Learns `atoms` unit atoms from samples ([n, dim]); the last tenth is held back to measure the relative
// reconstruction error the dictionary reports.
plan::Dictionary LearnDictionary(const std::vector<float>& samples, int dim, int atoms, int sparsity, int epochs);

}  // namespace kvplan
