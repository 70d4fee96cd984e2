"""Pooled "[CLS]" vectors from tiny random CLIP text models with an in-process tokenizer."""
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.mixing import build_aes_emb
from vmix_lib.text_encoders import clip_pooled, eos_positions, sd15_encode_pooled, sdxl_encode_pooled

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer(specials_first=False):
    """A real CLIPTokenizer over single letters (no merges), built in memory.

    With ``specials_first`` the letters get ids above EOS, so "EOS = highest id" stops being true.
    """
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [c for c in LETTERS] + [c + "</w>" for c in LETTERS]
    tokens = specials + tokens if specials_first else tokens + specials
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_model(cls, tokenizer, hidden, seed, eos_token_id=None, projection_dim=8):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
    )
    return cls(config).eval()


def test_sd15_pooled_is_the_final_layer_norm_eos_state():
    tok = tiny_tokenizer()
    model = tiny_model(CLIPTextModel, tok, hidden=24, seed=0)
    texts = ["vibrant color", "sks", "x" * 300]  # the last is truncated to 77 tokens
    pooled = sd15_encode_pooled(model, tok)(texts)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, 24)
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids)
    # "vibrant color" = BOS + 12 letters + EOS -> EOS at 13; "sks" -> 4; truncated -> 76
    assert eos_positions(ids, tok.eos_token_id).tolist() == [13, 4, 76]
    assert torch.equal(pooled, out.pooler_output)
    for row, pos in enumerate([13, 4, 76]):
        assert torch.equal(pooled[row], out.last_hidden_state[row, pos])
        assert not torch.equal(pooled[row], out.last_hidden_state[row, pos + 1 if pos < 76 else 0])
    # final layer norm applied: zero mean, unit variance before the affine part (default weights 1, 0)
    torch.testing.assert_close(pooled.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)


def test_eos_found_by_id_even_when_it_is_not_the_highest_id():
    """transformers' legacy argmax pooling (config eos_token_id 2) picks the wrong token here; we do not."""
    tok = tiny_tokenizer(specials_first=True)
    model = tiny_model(CLIPTextModel, tok, hidden=16, seed=1, eos_token_id=2)
    texts = ["ab zz c"]
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert ids[0].argmax() != eos_positions(ids, tok.eos_token_id)[0]
    pooled = clip_pooled(model, tok, texts)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    assert torch.equal(pooled[0], hidden[0, int(eos_positions(ids, tok.eos_token_id)[0])])


def test_sdxl_pooled_concatenates_clip_l_and_unprojected_open_clip_g():
    tok_l, tok_g = tiny_tokenizer(), tiny_tokenizer()
    clip_l = tiny_model(CLIPTextModel, tok_l, hidden=24, seed=2)
    clip_g = tiny_model(CLIPTextModelWithProjection, tok_g, hidden=40, seed=3, projection_dim=8)
    encode = sdxl_encode_pooled(clip_l, tok_l, clip_g, tok_g)
    texts = ["natural lighting", "ohwx"]
    pooled = encode(texts)
    assert pooled.shape == (2, 24 + 40)  # 768 + 1280 = 2048 at full size
    assert torch.equal(pooled[:, :24], clip_pooled(clip_l, tok_l, texts))
    ids = tok_g(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        g_pooled = clip_g.text_model(input_ids=ids).pooler_output  # before text_projection
        projected = clip_g(input_ids=ids).text_embeds
    assert torch.equal(pooled[:, 24:], g_pooled)
    assert projected.shape[-1] == 8  # the projection would have left the context width


def test_build_aes_emb_with_a_real_encoder():
    tok = tiny_tokenizer()
    model = tiny_model(CLIPTextModel, tok, hidden=24, seed=4)
    emb = build_aes_emb(sd15_encode_pooled(model, tok), DEFAULT_DIMENSIONS)
    assert emb.shape == (12, 24)
    assert torch.equal(emb[0], clip_pooled(model, tok, [DEFAULT_DIMENSIONS[0].positive])[0])
    assert torch.equal(emb[6], clip_pooled(model, tok, [DEFAULT_DIMENSIONS[0].negative])[0])
    assert len({tuple(row.tolist()) for row in emb}) == 12


def test_tokenizer_stand_in_and_errors():
    """Any callable with the transformers tokenizer interface serves; a missing EOS is an error."""
    model = tiny_model(CLIPTextModel, tiny_tokenizer(), hidden=16, seed=5)

    class StandIn:
        eos_token_id = 53

        def __call__(self, texts, padding, max_length, truncation, return_tensors):
            assert (padding, max_length, truncation, return_tensors) == ("max_length", 77, True, "pt")
            ids = torch.full((len(texts), 77), 53)
            ids[:, 0] = 52
            for row, text in enumerate(texts):
                ids[row, 1 : 1 + len(text)] = torch.tensor([ord(c) - ord("a") for c in text])
            return {"input_ids": ids}

    pooled = clip_pooled(model, StandIn(), ["abc", "z"])
    with torch.no_grad():
        hidden = model(input_ids=StandIn()(["abc", "z"], "max_length", 77, True, "pt")["input_ids"]).last_hidden_state
    assert torch.equal(pooled, torch.stack([hidden[0, 4], hidden[1, 2]]))
    no_eos = StandIn()
    no_eos.eos_token_id = 50
    with pytest.raises(ValueError, match="no end-of-text token"):
        clip_pooled(model, no_eos, ["abc"])
    with pytest.raises(ValueError, match="no texts"):
        clip_pooled(model, StandIn(), [])
