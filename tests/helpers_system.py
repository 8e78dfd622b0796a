"""The tiny StarFlowSystem most sampling/conversion/evaluation tests build: 4 frames of 8x8
pixels -> 4 x 4x4 tokens of 12 channels, 2-layer deep block, 1-layer denoiser (load_config
overrides; later overrides win, so a test appends its own)."""

TINY_SYSTEM = [
    "model.latent_channels=12", "model.num_blocks=3", "model.shallow_width=32",
    "model.shallow_layers=1", "model.deep_width=32", "model.deep_layers=2", "model.head_dim=16",
    "model.text_length=4", "model.text_width=16", "model.denoiser_layers=1", "model.noise_std=0.3",
    "model.pt_seq_len=4", "text.width=16", "text.layers=1", "text.heads=2", "text.vocab_size=64",
    "data.frames=4", "data.height=8", "data.width=8", "data.num_train_clips=64",
    "data.num_heldout_clips=4",
]
