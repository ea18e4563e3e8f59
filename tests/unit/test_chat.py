import pytest

from mechsafe.chat import encode_prompts, format_prompt, pad_right
from mechsafe.errors import MechsafeError


def test_content_span_covers_exactly_the_user_text(tokenizer):
    (enc,) = encode_prompts(tokenizer, ["hello there"])
    start, stop = enc.content
    assert tokenizer.decode(enc.ids[start:stop]).replace(" ", "") == "hellothere"
    text = format_prompt(tokenizer, "hello there")
    assert text.endswith("<|im_start|>assistant\n")  # last token is the post-instruction position
    assert len(enc.ids) > stop  # template tokens follow the user's text


def test_truncation_keeps_template_and_end_of_request(tokenizer):
    long = "a" * 50 + "END"
    (full,) = encode_prompts(tokenizer, [long])
    (cut,) = encode_prompts(tokenizer, [long], max_length=len(full) - 10)
    assert len(cut) == len(full) - 10
    assert cut.ids[-20:] == full.ids[-20:] and cut.ids[:5] == full.ids[:5]
    assert cut.content[1] - cut.content[0] == full.content[1] - full.content[0] - 10


def test_empty_prompt_is_rejected(tokenizer):
    with pytest.raises(MechsafeError, match="empty"):
        encode_prompts(tokenizer, ["  "])


def test_pad_right_tracks_lengths():
    tokens, lengths = pad_right([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1]
