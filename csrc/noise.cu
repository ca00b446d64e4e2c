// Fused Philox noise ops: one read of the input, one write of the output, noise made in registers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>  // not extension.h: no pybind11 or C++ frontend needed here (halves the compile)

#include "philox.cuh"

namespace dsd_fast {
namespace {

constexpr int kThreads = 256;

// y = x + sigma * eps, eps[b, j] = randn(seed, index[b] * chw + j).
template <typename T>
__global__ void corrupt_kernel(const T* __restrict__ x, const int64_t* __restrict__ index, T* __restrict__ y,
                               float sigma, uint64_t seed, int64_t chw, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / chw, j = i - b * chw;
    const float eps = philox_randn(seed, static_cast<uint64_t>(index[b] * chw + j));
    y[i] = static_cast<T>(static_cast<float>(x[i]) + sigma * eps);
  }
}

// x_t = y + sqrt(sigma_t[b]^2 - sigma^2) * eps, eps[b, j] = randn(seed, offset + b * chw + j).
template <typename T>
__global__ void add_noise_kernel(const T* __restrict__ y, const float* __restrict__ sigma_t, T* __restrict__ x_t,
                                 float sigma, uint64_t seed, uint64_t offset, int64_t chw, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / chw;
    const float s = sigma_t[b];
    // (s - sigma)(s + sigma): no cancellation near sigma (as reference.edm.added_variance).
    const float k = sqrtf(fmaxf((s - sigma) * (s + sigma), 0.0f));
    x_t[i] = static_cast<T>(static_cast<float>(y[i]) + k * philox_randn(seed, offset + static_cast<uint64_t>(i)));
  }
}

int grid_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, (int64_t)sms * 32));
}

void check_image(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D tensor (NCHW), got ", t.dim(), " dims");
}

}  // namespace

torch::Tensor corrupt(torch::Tensor x, double sigma, uint64_t seed, torch::Tensor index) {
  check_image(x, "x");
  TORCH_CHECK(index.scalar_type() == torch::kLong && index.numel() == x.size(0), "index: expected int64 [B]");
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  index = index.to(x.device()).contiguous();
  auto y = torch::empty_like(x);
  const int64_t n = x.numel(), chw = n / std::max<int64_t>(x.size(0), 1);
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "corrupt", [&] {
    corrupt_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), static_cast<float>(sigma), seed,
        chw, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

torch::Tensor add_noise(torch::Tensor y, torch::Tensor sigma_t, double sigma, uint64_t seed, uint64_t offset) {
  check_image(y, "y");
  TORCH_CHECK(sigma_t.numel() == y.size(0), "sigma_t: expected [B]");
  const c10::cuda::CUDAGuard guard(y.device());
  y = y.contiguous();
  sigma_t = sigma_t.to(y.device(), torch::kFloat).contiguous();
  auto x_t = torch::empty_like(y);
  const int64_t n = y.numel(), chw = n / std::max<int64_t>(y.size(0), 1);
  if (n == 0) return x_t;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "add_noise", [&] {
    add_noise_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), sigma_t.data_ptr<float>(), x_t.data_ptr<scalar_t>(), static_cast<float>(sigma), seed,
        offset, chw, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x_t;
}

}  // namespace dsd_fast
