// The one table of cbfused's loss kinds and reductions. The op schema passes them as ints;
// Python reads this table through cbfused._C.loss_kinds() / reductions() (csrc/library.cpp)
// and derives every name list, family test and option check from it (cbfused/_ops.py,
// tests/testing.py). Adding a loss kind: its formula in math.h, a row here, its case in the
// row kernels of its family, and its formula in cbfused/reference.py (docs/design.md).
#pragma once

#include <cstdint>

namespace cbfused {

enum LossType : int64_t { kSoftmax = 0, kSigmoid = 1, kFocal = 2, kSoftmaxFocal = 3 };
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2, kWeightedMean = 3 };

// The row composition a loss kind uses: softmax over the row's classes, or C independent
// binary (sigmoid) terms.
enum class Family : int { kSoftmaxRow = 0, kBinary = 1 };

struct LossKind {
  LossType code;
  const char* name;  // the loss_type string of the Python API
  Family family;
  bool focal;       // has the focal modulator: gamma applies
  bool alpha;       // takes torchvision's alpha
  const char* doc;  // one line for the API table
};

inline constexpr LossKind kLossKinds[] = {
    {kSoftmax, "softmax", Family::kSoftmaxRow, false, false, "softmax cross-entropy"},
    {kSigmoid, "sigmoid", Family::kBinary, false, true, "sigmoid (binary) cross-entropy over every class"},
    {kFocal, "focal", Family::kBinary, true, true, "the paper's sigmoid focal loss"},
    {kSoftmaxFocal, "softmax_focal", Family::kSoftmaxRow, true, false,
     "focal loss on the softmax probability"},
};
inline constexpr int64_t kNumLossKinds = sizeof(kLossKinds) / sizeof(kLossKinds[0]);

struct ReductionKind {
  Reduction code;
  const char* name;
};

inline constexpr ReductionKind kReductions[] = {
    {kNone, "none"}, {kSum, "sum"}, {kMean, "mean"}, {kWeightedMean, "weighted_mean"}};
inline constexpr int64_t kNumReductions = sizeof(kReductions) / sizeof(kReductions[0]);

// How class weights apply once targets are not one-hot (label smoothing, soft labels):
// the paper's rule, the sample's weight s times its whole loss, or PyTorch's, class term c
// times w_c (F.cross_entropy(weight=w)).
enum Weighting : int64_t { kSampleWeighting = 0, kClassWeighting = 1 };

struct WeightingKind {
  Weighting code;
  const char* name;
};

inline constexpr WeightingKind kWeightings[] = {{kSampleWeighting, "sample"}, {kClassWeighting, "class"}};
constexpr bool valid_weighting(int64_t code) { return code == kSampleWeighting || code == kClassWeighting; }

constexpr bool valid_loss_type(int64_t code) { return code >= 0 && code < kNumLossKinds; }
constexpr bool valid_reduction(int64_t code) { return code >= 0 && code < kNumReductions; }

// Family and traits of a loss code (valid_loss_type(code) assumed).
constexpr const LossKind& loss_kind(int64_t code) { return kLossKinds[code]; }
constexpr bool is_softmax_family(int64_t code) { return kLossKinds[code].family == Family::kSoftmaxRow; }
constexpr bool is_focal(int64_t code) { return kLossKinds[code].focal; }

// The table's rows are in code order (loss_kind indexes it by code).
constexpr bool table_in_code_order() {
  for (int64_t i = 0; i < kNumLossKinds; ++i)
    if (kLossKinds[i].code != i) return false;
  for (int64_t i = 0; i < kNumReductions; ++i)
    if (kReductions[i].code != i) return false;
  return true;
}
static_assert(table_in_code_order(), "kinds.h: rows must be listed in code order");

}  // namespace cbfused
