"""Model side: loading (dtype, attention, quantization, Liger) and training modes."""
