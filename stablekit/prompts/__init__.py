"""The AUTOMATIC1111 web UI's prompt syntax: extra-network tags, prompt editing and
alternation schedules, emphasis weights, BREAK, and 75-token chunking. Pure Python."""

from .chunks import BOS_ID, COMMA_ID, EOS_ID, SD2_PAD_ID, ChunkedPrompt, bpe_tokenize, chunk_prompt, tokenize_line
from .parser import NetworkTag, extract_networks, lora_weights, parse_prompt_attention, prompt_schedules

__all__ = [
    "BOS_ID", "COMMA_ID", "EOS_ID", "SD2_PAD_ID", "ChunkedPrompt", "NetworkTag",
    "bpe_tokenize", "chunk_prompt", "extract_networks", "lora_weights",
    "parse_prompt_attention", "prompt_schedules", "tokenize_line",
]
