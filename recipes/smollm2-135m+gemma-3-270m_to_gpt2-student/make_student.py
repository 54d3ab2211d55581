"""A small randomly initialised causal LM with the real GPT-2 tokenizer: the student of the fusion recipe.

No package ships GPT-2 weights, so the student starts from scratch (Llama architecture, 4 layers, hidden 256,
vocabulary 50,257: about 17M parameters, most of them the embedding) and learns only from the two teachers and the
text. Written atomically: the folder appears only when complete.

    python recipes/smollm2-135m+gemma-3-270m_to_gpt2-student/make_student.py outputs/gpt2_student
"""

from __future__ import annotations

import sys


def main(output_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_interop import load_gpt2_tokenizer
    from hf_interop.utils import staged_output_dir

    tokenizer = load_gpt2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with staged_output_dir(output_dir) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    print(f"wrote {output_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/gpt2_student")
