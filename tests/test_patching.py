import pytest
import torch

from patchwork.engines.blt.config import OFFSET, PatchingConfig
from patchwork.engines.blt.patching import lengths_from_starts, patch_ids_from_starts, patch_starts


def symbols(text: bytes) -> torch.Tensor:
    return torch.tensor([[1] + [b + OFFSET for b in text]])


def starts_of(text: bytes, entropies=None, **cfg) -> list[int]:
    tokens = symbols(text)
    if entropies is not None:
        entropies = torch.tensor([entropies], dtype=torch.float32)
    return patch_starts(tokens, entropies, PatchingConfig(**cfg))[0].int().tolist()


def test_global_entropy_rule_starts_a_patch_after_each_high_entropy_position():
    # 6 symbols (BOS + 5 bytes); entropies[t] is H(x_{t+1} | x_<=t).
    entropies = [9.0, 0.1, 2.0, 0.5, 3.0, 0.2]
    # Position 0 (BOS) and 1 always start; p >= 2 starts iff entropies[p - 1] > 1.5.
    assert starts_of(b"abcde", entropies, threshold=1.5) == [1, 1, 0, 1, 0, 1, 0]


def test_monotonic_rule_compares_consecutive_entropies():
    entropies = [9.0, 0.1, 2.0, 1.5, 3.0, 3.1]
    # p = 2 always starts; p >= 3 iff entropies[p-1] - entropies[p-2] > 1.0
    assert starts_of(b"abcde", entropies, mode="monotonic", threshold=1.0) == [1, 1, 1, 1, 0, 1, 0]


def test_static_patches_after_bos():
    assert starts_of(b"abcdefg", mode="static", patch_size=3) == [1, 1, 0, 0, 1, 0, 0, 1, 0]


def test_space_patching_ends_a_patch_after_the_first_of_a_run_of_separators():
    # "ab  cd,e": the first space closes "ab ", the second space joins the next patch.
    text = b"ab  cd,e"
    starts = starts_of(text, mode="space")
    assert starts == [1, 1, 0, 0, 1, 0, 0, 0, 1, 0]
    assert lengths_from_starts(starts[1 : len(text) + 1]) == [3, 4, 1]


def test_space_patching_treats_utf8_lead_bytes_as_separators_like_the_reference():
    # BOS, then C3 B1 'a' 'n' 'd' C3 BA ' ' 'o' 'k': the lead byte C3 right after
    # BOS continues BOS's run of separators; the second C3 and the space end patches.
    text = "ñandú ok".encode()
    starts = starts_of(text, mode="space")
    assert lengths_from_starts(starts[1 : len(text) + 1]) == [6, 2, 2]


@pytest.mark.parametrize("mode", ["entropy", "static", "space"])
def test_max_patch_length_splits_long_patches_into_full_pieces_and_a_remainder(mode):
    entropies = [0.0] * 15  # never above the threshold: one long patch
    starts = starts_of(b"x" * 14, entropies, mode=mode, threshold=1.0, patch_size=100, max_patch_length=4)
    assert lengths_from_starts(starts) == [1, 4, 4, 4, 3]


def test_decisions_depend_only_on_the_prefix():
    torch.manual_seed(0)
    tokens = torch.randint(OFFSET, 260, (3, 40))
    entropies = torch.rand(3, 40) * 3
    for cfg in [PatchingConfig(threshold=1.5), PatchingConfig(mode="monotonic", threshold=0.5),
                PatchingConfig(mode="space", max_patch_length=3)]:
        full = patch_starts(tokens, entropies, cfg)
        for cut in (2, 7, 23, 39):
            prefix = patch_starts(tokens[:, :cut], entropies[:, :cut], cfg)
            assert torch.equal(prefix, full[:, : cut + 1])


def test_patch_ids_count_starts():
    starts = torch.tensor([[1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert patch_ids_from_starts(starts).tolist() == [[0, 1, 1, 2, 2, 2, 3]]
    assert lengths_from_starts(starts[0]) == [1, 2, 3, 1]
