// The CPU implementations of the ether_kernels ops: one registration block for the device.
#include <torch/library.h>

#include "dtw_ops.h"
#include "ops_cpu.h"

TORCH_LIBRARY_IMPL(ether_kernels, CPU, m) {
  m.impl("ether_loss_forward", &ether_kernels::cpu::ether_loss_forward_cpu);
  m.impl("ether_loss_backward", &ether_kernels::cpu::ether_loss_backward_cpu);
  m.impl("mse_loss_forward", &ether_kernels::cpu::mse_loss_forward_cpu);
  m.impl("mse_loss_backward", &ether_kernels::cpu::mse_loss_backward_cpu);
  m.impl("mse_loss_backward_", &ether_kernels::cpu::mse_loss_backward_inplace_cpu);
  m.impl("dtw_forward", &ether_kernels::cpu::dtw_forward_cpu);
  m.impl("dtw_backward", &ether_kernels::cpu::dtw_backward_cpu);
  m.impl("dtw_xy_forward", &ether_kernels::cpu::dtw_xy_forward_cpu);
  m.impl("dtw_xy_backward", &ether_kernels::cpu::dtw_xy_backward_cpu);
  m.impl("dtw_xy_soft_forward_checkpointed",
         &ether_kernels::cpu::dtw_xy_soft_forward_checkpointed_cpu);
  m.impl("dtw_xy_soft_backward_checkpointed",
         &ether_kernels::cpu::dtw_xy_soft_backward_checkpointed_cpu);
  m.impl("amss_mask_gradients", &ether_kernels::cpu::amss_mask_gradients_cpu);
  m.impl("amss_masked_sgd_step", &ether_kernels::cpu::amss_masked_sgd_step_cpu);
  m.impl("multimodal_loss_forward", &ether_kernels::cpu::multimodal_loss_forward_cpu);
}
