// Named shape/dtype checks for the host wrappers: a failed check says which argument is wrong.
#pragma once

#define CHECK_CUDA_DTYPE(t, dtype, dims)                                                             \
    TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor");                                         \
    TORCH_CHECK((t).scalar_type() == (dtype), #t " has dtype ", (t).scalar_type(), ", expected " #dtype); \
    TORCH_CHECK((t).dim() == (dims), #t " must have ", (dims), " dimensions, got ", (t).dim());      \
    TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

#define CHECK_CUDA_F32(t, dims) CHECK_CUDA_DTYPE(t, at::kFloat, dims)
