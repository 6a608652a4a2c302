// The only module definition of exl2conv's extension (built by exl2conv/kernels.py).
#include <torch/extension.h>

void gptq_block(torch::Tensor w, torch::Tensor scale, torch::Tensor zero, torch::Tensor maxq, torch::Tensor u,
                torch::Tensor q_out, torch::Tensor codes, torch::Tensor err, int64_t a);
torch::Tensor pgrid_err(torch::Tensor x, torch::Tensor cand, torch::Tensor p, int64_t bits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("gptq_block", &gptq_block, "GPTQ over one 32-row block for C candidates (see csrc/quantize.cu)");
    m.def("pgrid_err", &pgrid_err, "p-grid scale search error sums (see csrc/quantize.cu)");
}
