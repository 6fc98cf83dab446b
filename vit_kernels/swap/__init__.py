"""swap_modules for timm, transformers and torchvision (issue: "The reference ViT, and swap_modules"): not written yet."""
