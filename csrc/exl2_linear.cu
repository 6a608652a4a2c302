// The EXL2 linear's kernels, torch side: argument checks, launch shapes, the launches. The device
// code is in exl2_linear_kernels.cuh. Torch references: exl2conv/ops.py, exl2_dequant_ref and
// exl2_gemv_ref; tests/gpu/test_kernels.py checks parity.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "checks.h"
#include "exl2_linear_kernels.cuh"

namespace {

// Shapes shared by both operations: q_weight [rows, N] int32, q_scale [G, N/8] int32,
// q_scale_max [G] fp16, q_perm [K] int32, q_map [chunks, 4] int32 (exl2conv/pack.py, chunk_map).
// Returns K. The map's contents (rows, bit widths, groups) come from the validated q_groups; here
// only its shape is checked against K.
int check_packed(const at::Tensor& q_weight, const at::Tensor& q_scale, const at::Tensor& q_scale_max,
                 const at::Tensor& q_perm, const at::Tensor& q_map)
{
    CHECK_CUDA_DTYPE(q_weight, at::kInt, 2);
    CHECK_CUDA_DTYPE(q_scale, at::kInt, 2);
    CHECK_CUDA_DTYPE(q_scale_max, at::kHalf, 1);
    CHECK_CUDA_DTYPE(q_perm, at::kInt, 1);
    CHECK_CUDA_DTYPE(q_map, at::kInt, 2);
    const int64_t N = q_weight.size(1), K = q_perm.size(0), G = q_scale.size(0);
    TORCH_CHECK(N > 0 && N % 32 == 0, "q_weight: N = ", N, " must be a positive multiple of 32");
    TORCH_CHECK(K > 0, "q_perm: a linear needs at least one input feature");
    TORCH_CHECK(q_scale.size(1) * 8 == N, "q_scale must be [G, N/8], got width ", q_scale.size(1), " for N = ", N);
    TORCH_CHECK(q_scale_max.size(0) == G, "q_scale_max must be [G] = [", G, "]");
    TORCH_CHECK(q_map.size(1) == 4 && q_map.size(0) == (K + exl2::CHUNK - 1) / exl2::CHUNK,
                "q_map must be [ceil(K/32), 4] for K = ", K);
    // 16-byte loads of 4 columns: rows of N int32 are 128-byte multiples, the base must be aligned too
    TORCH_CHECK(reinterpret_cast<uintptr_t>(q_weight.data_ptr()) % 16 == 0, "q_weight must be 16-byte aligned");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(q_map.data_ptr()) % 16 == 0, "q_map must be 16-byte aligned");  // int4 rows
    TORCH_CHECK(q_weight.device() == q_scale.device() && q_weight.device() == q_scale_max.device() &&
                q_weight.device() == q_perm.device() && q_weight.device() == q_map.device(),
                "the packed tensors must be on one device");
    return (int) K;
}

// K splits of the gemv: enough blocks to fill the GPU (4 per SM), at least 8 chunks per block (one
// per warp) and at most MAX_CHUNKS_PER_SPLIT (the shared slice of x), and a float32 workspace of at
// most an eighth of q_weight's bytes (the splits' partial sums are extra memory traffic).
int chunks_per_split(int chunks, int tiles, int batch, int64_t packed_rows, int sms)
{
    int splits = std::max(1, (4 * sms + tiles - 1) / tiles);
    splits = std::min(splits, std::max(1, (chunks + exl2::WARPS - 1) / exl2::WARPS));
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, packed_rows / (8 * batch)));
    int cps = (chunks + splits - 1) / splits;
    return std::min(std::max(cps, 1), exl2::MAX_CHUNKS_PER_SPLIT);
}

// The device's SM count, asked once per device (a decode step runs hundreds of gemvs). A race
// between threads writes the same value twice.
int multiprocessors(int device)
{
    static int cache[256] = {0};
    if (device < 0 || device >= 256) device = 0;
    if (cache[device] == 0)
    {
        int sms = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        cache[device] = sms;
    }
    return cache[device];
}

// The split-K counters of the gemv, one int32 per column tile: zeroed once per (device, stream) and
// left at zero by every launch (the last block of a tile resets it), so a decode step's hundreds of
// gemvs clear nothing. Launches on one stream run one after another and never share a counter;
// another stream gets its own buffer. Never freed (a CUDA tensor freed at exit can outlive the
// driver), a few KiB per stream.
at::Tensor tile_counters(const at::Tensor& like, int tiles)
{
    static std::mutex lock;
    static auto* buffers = new std::map<std::pair<int, int64_t>, at::Tensor>();
    const auto key = std::make_pair((int) like.get_device(), (int64_t) c10::cuda::getCurrentCUDAStream().id());
    const std::lock_guard<std::mutex> guard(lock);
    at::Tensor& buf = (*buffers)[key];
    if (!buf.defined() || buf.numel() < tiles)
        buf = at::zeros({std::max<int64_t>(tiles, 4096)}, like.options().dtype(at::kInt));
    return buf;
}

template <int B>
void launch_gemv(const at::Tensor& x, const at::Tensor& q_weight, const at::Tensor& q_scale,
                 const at::Tensor& q_scale_max, const at::Tensor& q_perm, const at::Tensor& q_map, int K,
                 at::Tensor& y)
{
    const int N = q_weight.size(1), chunks = q_map.size(0);
    const int tiles = (N + exl2::TILE - 1) / exl2::TILE;
    const int cps = chunks_per_split(chunks, tiles, B, q_weight.size(0), multiprocessors(q_weight.get_device()));
    const int splits = (chunks + cps - 1) / cps;
    at::Tensor partial, counters;
    if (splits > 1)
    {
        partial = at::empty({splits, B, N}, q_weight.options().dtype(at::kFloat));
        counters = tile_counters(q_weight, tiles);
    }
    const dim3 grid(tiles, splits);
    exl2::gemv_kernel<B><<<grid, exl2::THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const __half*>(x.data_ptr()), reinterpret_cast<const uint32_t*>(q_weight.data_ptr()),
        reinterpret_cast<const uint32_t*>(q_scale.data_ptr()), reinterpret_cast<const __half*>(q_scale_max.data_ptr()),
        q_perm.data_ptr<int>(), q_map.data_ptr<int>(), K, N, chunks, cps,
        splits > 1 ? partial.data_ptr<float>() : nullptr, splits > 1 ? counters.data_ptr<int>() : nullptr,
        reinterpret_cast<__half*>(y.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// fp16 W^T [K, N] in the model's row order, equal bit for bit to exl2conv.pack.decode_linear.
at::Tensor exl2_dequant(at::Tensor q_weight, at::Tensor q_scale, at::Tensor q_scale_max, at::Tensor q_perm,
                        at::Tensor q_map)
{
    const c10::cuda::OptionalCUDAGuard guard(q_weight.device());
    const int K = check_packed(q_weight, q_scale, q_scale_max, q_perm, q_map);
    const int N = q_weight.size(1), chunks = q_map.size(0);
    at::Tensor out = at::empty({K, N}, q_weight.options().dtype(at::kHalf));
    const dim3 grid((N + exl2::TILE - 1) / exl2::TILE, (chunks + exl2::WARPS - 1) / exl2::WARPS);
    exl2::dequant_kernel<<<grid, exl2::THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint32_t*>(q_weight.data_ptr()), reinterpret_cast<const uint32_t*>(q_scale.data_ptr()),
        reinterpret_cast<const __half*>(q_scale_max.data_ptr()), q_perm.data_ptr<int>(), q_map.data_ptr<int>(),
        chunks, N, reinterpret_cast<__half*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

// y [B, N] fp16 = x [B, K] fp16 @ W^T, B = 1..8, float32 accumulation.
at::Tensor exl2_gemv(at::Tensor x, at::Tensor q_weight, at::Tensor q_scale, at::Tensor q_scale_max, at::Tensor q_perm,
                     at::Tensor q_map)
{
    const c10::cuda::OptionalCUDAGuard guard(q_weight.device());
    const int K = check_packed(q_weight, q_scale, q_scale_max, q_perm, q_map);
    CHECK_CUDA_DTYPE(x, at::kHalf, 2);
    TORCH_CHECK(x.size(1) == K, "x must be [B, K] with K = ", K, ", got width ", x.size(1));
    TORCH_CHECK(x.device() == q_weight.device(), "x must be on the packed tensors' device");
    const int B = x.size(0);
    TORCH_CHECK(B >= 1 && B <= exl2::MAX_BATCH, "exl2_gemv takes 1 to ", exl2::MAX_BATCH, " rows, got ", B);
    at::Tensor y = at::empty({B, q_weight.size(1)}, x.options());
    switch (B)
    {
        case 1: launch_gemv<1>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 2: launch_gemv<2>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 3: launch_gemv<3>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 4: launch_gemv<4>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 5: launch_gemv<5>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 6: launch_gemv<6>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        case 7: launch_gemv<7>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
        default: launch_gemv<8>(x, q_weight, q_scale, q_scale_max, q_perm, q_map, K, y); break;
    }
    return y;
}
