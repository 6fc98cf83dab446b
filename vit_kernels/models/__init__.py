"""The reference ViT (issue: "The reference ViT, and swap_modules"): not written yet."""
