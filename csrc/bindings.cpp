// The only registration of exl2conv's kernels (built by exl2conv/kernels.py): operators in the
// torch.ops.exl2conv namespace. torch/library.h instead of torch/extension.h (pybind11 and all of
// libtorch's C++ API) keeps the first-use build short.
#include <torch/library.h>

void gptq_block(at::Tensor w, at::Tensor scale, at::Tensor zero, at::Tensor maxq, at::Tensor u,
                at::Tensor q_out, at::Tensor codes, at::Tensor err, int64_t a);
at::Tensor pgrid_err_many(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor cand,
                          at::Tensor p, int64_t a);
at::Tensor refine_qs_many(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor qs,
                          at::Tensor qmax, at::Tensor rw, int64_t a);
std::vector<at::Tensor> params_start(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor half_m, int64_t a);
std::vector<at::Tensor> params_finish(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor out_idx,
                                      at::Tensor err, at::Tensor grid, at::Tensor qs, at::Tensor s_max, at::Tensor rw,
                                      at::Tensor scale_out, int64_t a);
void codes_of(at::Tensor q, at::Tensor scale, at::Tensor group, at::Tensor zero, at::Tensor codes);
at::Tensor coded_delta(at::Tensor codes, at::Tensor zero, at::Tensor scale, at::Tensor group, at::Tensor invperm,
                       at::Tensor base);
at::Tensor exl2_dequant(at::Tensor q_weight, at::Tensor q_scale, at::Tensor q_scale_max, at::Tensor q_perm,
                        at::Tensor q_map);
at::Tensor exl2_gemv(at::Tensor x, at::Tensor q_weight, at::Tensor q_scale, at::Tensor q_scale_max, at::Tensor q_perm,
                     at::Tensor q_map);

TORCH_LIBRARY(exl2conv, m)
{
    m.def("gptq_block", &gptq_block);          // one 32-row GPTQ block for C candidates
    m.def("pgrid_err_many", &pgrid_err_many);  // p-grid error partial sums, one group of each of B candidates
    m.def("refine_qs_many", &refine_qs_many);  // each column's scale index refined, one group of each of B candidates
    m.def("params_start", &params_start);      // the scale search before the p-grid, one group of each of B candidates
    m.def("params_finish", &params_finish);    // and after it: best p, refined indices, scales written
    m.def("codes_of", &codes_of);              // a quantized weight's codes from its dequantized values
    m.def("coded_delta", &coded_delta);        // a coded candidate minus the unquantized weight, in bfloat16
    m.def("exl2_dequant", &exl2_dequant);      // an EXL2 linear's fp16 W^T from its packed tensors
    m.def("exl2_gemv", &exl2_gemv);            // x @ W^T for 1..8 rows, read from the packed tensors
}
