"""What is done with finished runs: classify files (predict), average them (soup), export them
(ONNX, transformers, timm)."""
