// Input checks of the library op e2kd_cpp::distill_loss, shared by its CPU kernel
// (csrc/cpu/distill_loss.cpp) and its CUDA kernel (csrc/cuda/distill_loss.cu).
//
// The Python op e2kd::distill_loss (e2kd_fast/ops/distill_loss.py) checks the shapes before it
// calls a back end, and names itself in its errors; these checks guard the library op itself.
#pragma once

#include <ATen/ATen.h>

namespace e2kd_cpp::distill_loss {

// Logits [N, C] (student and teacher alike), maps [N, ...] (alike), N > 0; student and teacher of
// one kind share a dtype; floating point; one device.
inline void check_inputs(const at::Tensor& zs, const at::Tensor& zt, const at::Tensor& es, const at::Tensor& et) {
  TORCH_CHECK(zs.dim() == 2, "e2kd_cpp::distill_loss: student_logits must be [N, C], got ", zs.sizes());
  TORCH_CHECK(zt.sizes() == zs.sizes(), "e2kd_cpp::distill_loss: teacher_logits ", zt.sizes(),
              " differ from student_logits ", zs.sizes());
  TORCH_CHECK(es.sizes() == et.sizes(), "e2kd_cpp::distill_loss: student_maps ", es.sizes(),
              " differ from teacher_maps ", et.sizes());
  TORCH_CHECK(es.dim() >= 1 && es.size(0) == zs.size(0), "e2kd_cpp::distill_loss: maps ", es.sizes(),
              " must have the logits' batch size ", zs.size(0), " as their first dimension");
  TORCH_CHECK(zs.size(0) > 0, "e2kd_cpp::distill_loss: empty batch");
  TORCH_CHECK(zs.scalar_type() == zt.scalar_type() && es.scalar_type() == et.scalar_type(),
              "e2kd_cpp::distill_loss: student and teacher must share a dtype (logits ", zs.scalar_type(), "/",
              zt.scalar_type(), ", maps ", es.scalar_type(), "/", et.scalar_type(), ")");
  TORCH_CHECK(at::isFloatingType(zs.scalar_type()) && at::isFloatingType(es.scalar_type()),
              "e2kd_cpp::distill_loss: floating-point inputs expected");
  TORCH_CHECK(zt.device() == zs.device() && es.device() == zs.device() && et.device() == zs.device(),
              "e2kd_cpp::distill_loss: all inputs must be on one device");
}

}  // namespace e2kd_cpp::distill_loss
