// pybind11 module dsd_fast._C: CUDA kernels behind the dsd_fast::<op> torch.library ops.
#include <torch/extension.h>

namespace dsd_fast {
torch::Tensor corrupt(torch::Tensor x, double sigma, uint64_t seed, torch::Tensor index);
torch::Tensor add_noise(torch::Tensor y, torch::Tensor sigma_t, double sigma, uint64_t seed, uint64_t offset);
}  // namespace dsd_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsd_fast CUDA kernels (Philox noise ops)";
  m.def("corrupt", &dsd_fast::corrupt, "y = x + sigma * eps(seed, index)");
  m.def("add_noise", &dsd_fast::add_noise, "x_t = y + sqrt(sigma_t^2 - sigma^2) * eps(seed, offset)");
}
