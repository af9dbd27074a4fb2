// The ether_kernels operator library: every schema, in one place, and the Python module
// `ether_kernels._C` that carries them. Device implementations live in csrc/<device>/<op>.*
// (TORCH_LIBRARY_IMPL blocks); fake kernels and autograd are registered from Python
// (ether_kernels/ops.py), so torch.compile and opcheck see every op.
//
// pybind11 serves only build information here: the ops themselves are dispatcher ops, which
// torch.compile can trace, unlike pybind11 functions.
#include <torch/extension.h>

#include "cpu/cpu_capability.h"

TORCH_LIBRARY(ether_kernels, m) {
  // Ether loss. The modalities arrive as membership pairs: channel member_channel[e] belongs
  // to modality member_group[e]; weights is (M,) float64. discrepancy: 0 = l1, 1 = l2;
  // reduction of the intra term: 0 = mean, 1 = sum. Returns the loss (0-dim, input dtype)
  // and the inter-term coefficient per channel, (C,) or (B, C) when per_sample, that the
  // backward needs (fp32, or fp64 for fp64 inputs).
  m.def(
      "ether_loss_forward(Tensor y_pred, Tensor y_true, Tensor member_channel, "
      "Tensor member_group, Tensor weights, float alpha, int discrepancy, int reduction, "
      "bool per_sample) -> (Tensor, Tensor)");
  // One elementwise pass: grad_pred = g * (k * (p - t) + coef[channel]) and
  // grad_true = -g * k * (p - t), k = 2 / N for reduction 0 (mean), 2 for 1 (sum).
  // A gradient that is not needed comes back empty. (Scales travel as integer codes, not
  // floats, so that no kernel receives them rounded to fp32.)
  m.def(
      "ether_loss_backward(Tensor grad_loss, Tensor y_pred, Tensor y_true, Tensor coef, "
      "int reduction, bool per_sample, bool need_pred_grad, bool need_true_grad) "
      "-> (Tensor, Tensor)");
  // Fused MSE. reduction: 0 = mean, 1 = sum, 2 = none. With compute_grad (mean/sum only)
  // the second output is input - target (the backward multiplies it by 2 times the
  // upstream gradient, and 1 / N for the mean); else it is empty.
  m.def("mse_loss_forward(Tensor input, Tensor target, int reduction, bool compute_grad) "
        "-> (Tensor, Tensor)");
  // The backward of a mean/sum MSE whose forward kept difference = input - target:
  // grad_input = difference * 2 grad_loss (/ N for the mean), one pass, the product formed in
  // fp32 (fp64 for fp64) and rounded once.
  m.def("mse_loss_backward(Tensor grad_loss, Tensor difference, bool mean) -> Tensor");
  // The same, written over difference (CPU): the backward uses it when autograd frees the
  // forward's buffer right after (no retain_graph), so that no fresh input-sized tensor is
  // allocated: on the CPU a fresh large buffer costs its page faults (more than the pass).
  m.def("mse_loss_backward_(Tensor(a!) difference, Tensor grad_loss, bool mean) -> ()");
  // AMSS / AMSS+ (ether_kernels/amss.py): masks every gradient of a step in place. Units
  // are dim-0 slices of unit_size rows; tensor t belongs to modality group_of_tensor[t];
  // sampling (the mode) 0 amss, 1 amss+, 2 uniform, 3 topk; scaling 0 paper, 1 reference-code.
  m.def("amss_mask_gradients(Tensor(a!)[] grads, int[] group_of_tensor, float[] ratios, "
        "int sampling, int scaling, int seed, int step, int unit_size) -> ()");
  // SGD (torch.optim.SGD's rule) on the sampled units only: parameters and momentum buffers
  // of the other units do not move. buffers: one per tensor when momentum != 0 (fresh[t] = 1
  // for a buffer created for this step: buf = g on its kept units), else empty.
  m.def("amss_masked_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] buffers, "
        "int[] fresh, int[] group_of_tensor, float[] ratios, int sampling, int scaling, int seed, "
        "int step, int unit_size, float lr, float momentum, float dampening, float weight_decay, "
        "bool nesterov) -> ()");
  // The MultiModal loss (ether_kernels/multimodal_loss.py): z (B, M*C), labels int64 (B,),
  // W (M*C, C*K). Returns the mean loss and, with compute_grad, its gradients for z and W
  // (formed in the same pass; the backward scales them), else empty tensors.
  m.def("multimodal_loss_forward(Tensor z, Tensor labels, Tensor W, int num_classes, "
        "float gamma, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // DTW / soft-DTW on a precomputed (B, N, M) cost, per-pair lengths (int64 (B,)), band r
  // (-1 = none). Returns the values (B,) and, with keep, the accumulated cost R (B, N, M)
  // that the backward needs (else an empty tensor).
  m.def("dtw_forward(Tensor cost, Tensor x_lengths, Tensor y_lengths, int band, float gamma, "
        "bool soft, bool keep) -> (Tensor, Tensor)");
  // d value / d cost scaled by grad (B,): soft-DTW's expected alignment E (Cuturi & Blondel,
  // Algorithm 2), or for hard DTW the 0/1 indicator of the optimal path.
  m.def("dtw_backward(Tensor grad, Tensor cost, Tensor R, Tensor x_lengths, Tensor y_lengths, "
        "int band, float gamma, bool soft) -> Tensor");
  // The same from the series themselves: x (B, N, D), y (B, M, D), the local cost computed in
  // the kernel (metric 0 = sqeuclidean, 1 = euclidean, 2 = l1), never a (B, N, M, D) tensor.
  m.def("dtw_xy_forward(Tensor x, Tensor y, Tensor x_lengths, Tensor y_lengths, int metric, "
        "int band, float gamma, bool soft, bool keep) -> (Tensor, Tensor)");
  // Gradients for x and y (each empty when not needed) from E (soft) or the path (hard).
  m.def("dtw_xy_backward(Tensor grad, Tensor x, Tensor y, Tensor R, Tensor x_lengths, "
        "Tensor y_lengths, int metric, int band, float gamma, bool soft, bool need_x, "
        "bool need_y) -> (Tensor, Tensor)");
  // Soft-DTW on the series with bounded memory for long pairs (CPU): the forward keeps R of
  // every checkpoint_rows-th row only, (B, ceil(N / checkpoint_rows), M + 1) fp64, and the
  // backward recomputes the rows in between one segment at a time.
  m.def("dtw_xy_soft_forward_checkpointed(Tensor x, Tensor y, Tensor x_lengths, "
        "Tensor y_lengths, int metric, int band, float gamma, int checkpoint_rows) "
        "-> (Tensor, Tensor)");
  m.def("dtw_xy_soft_backward_checkpointed(Tensor grad, Tensor x, Tensor y, Tensor kept, "
        "Tensor x_lengths, Tensor y_lengths, int metric, int band, float gamma, "
        "int checkpoint_rows, bool need_x, bool need_y) -> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["simd"] = ether_kernels::cpu::capability_name();
#if defined(ETHER_KERNELS_HAVE_AVX512) && defined(ETHER_KERNELS_HAVE_AVX2)
  info["simd_compiled"] = pybind11::make_tuple("DEFAULT", "AVX2", "AVX512");
#else
  info["simd_compiled"] = pybind11::make_tuple("DEFAULT");
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(ETHER_KERNELS_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["compiler"] = std::string(__VERSION__);
  info["torch_built_with"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ether_kernels compiled operators (registered with the PyTorch dispatcher)";
  m.def("build_info", &build_info, "What this build of ether_kernels._C contains.");
}
