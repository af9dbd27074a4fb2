// Host-side CPU implementations of the ether_kernels ops (registered in register_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ether_kernels::cpu {

std::tuple<at::Tensor, at::Tensor> ether_loss_forward_cpu(
    const at::Tensor& y_pred, const at::Tensor& y_true, const at::Tensor& member_channel,
    const at::Tensor& member_group, const at::Tensor& weights, double alpha,
    int64_t discrepancy, int64_t reduction, bool per_sample);

std::tuple<at::Tensor, at::Tensor> ether_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& y_pred, const at::Tensor& y_true,
    const at::Tensor& coef, int64_t reduction, bool per_sample, bool need_pred_grad,
    bool need_true_grad);

std::tuple<at::Tensor, at::Tensor> mse_loss_forward_cpu(const at::Tensor& input,
                                                        const at::Tensor& target,
                                                        int64_t reduction, bool compute_grad);

at::Tensor mse_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& difference,
                                 bool mean);
void mse_loss_backward_inplace_cpu(const at::Tensor& difference, const at::Tensor& grad_loss,
                                   bool mean);

// AMSS / AMSS+ gradient masking of every tensor of a step, in place (amss.cpp).
void amss_mask_gradients_cpu(at::TensorList grads, at::IntArrayRef group_of_tensor,
                             at::ArrayRef<double> ratios, int64_t mode, int64_t scaling,
                             int64_t seed, int64_t step, int64_t unit_size);

// SGD on the sampled units only (parameters and momentum buffers), fused over every tensor.
void amss_masked_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                              at::IntArrayRef fresh, at::IntArrayRef group_of_tensor,
                              at::ArrayRef<double> ratios, int64_t mode, int64_t scaling,
                              int64_t seed, int64_t step, int64_t unit_size, double lr,
                              double momentum, double dampening, double weight_decay,
                              bool nesterov);

// The MultiModal loss, forward and gradients in one pass (multimodal_loss.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> multimodal_loss_forward_cpu(
    const at::Tensor& z, const at::Tensor& labels, const at::Tensor& W, int64_t num_classes,
    double gamma, bool compute_grad);

}  // namespace ether_kernels::cpu
