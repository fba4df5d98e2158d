"""Training: fine-tuning (task loss, distillation, next-token loss), Force Regularization,
low-rank training from scratch, and Denton's progressive fine-tuning."""
