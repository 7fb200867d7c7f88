"""Training: the VAE stage and the latent-diffusion stage, resumable, with logs and sample grids."""
