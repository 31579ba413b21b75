"""What a model costs: analytic params / flops / activations (complexity), the scaling strategies
(scaling), PyTorch's own count (counted), measured throughput and memory (measure) and MFU (mfu)."""
