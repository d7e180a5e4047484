"""MinHash near-duplicate removal (minicpm4/data/synth/dedup.py): exact and near duplicates go, distinct texts
stay, and the first text of each cluster is the one kept."""

from __future__ import annotations

import pytest

from minicpm4.data.synth.dedup import NearDuplicateFilter, near_duplicate_mask, normalise, shingles

# Three unrelated 60-word paragraphs.
GARDEN = ("Early spring is the best time to prepare a vegetable garden. Clear away the dead leaves, loosen the soil "
          "with a fork and mix in a generous layer of compost. Tomatoes and peppers need full sun, while lettuce and "
          "spinach tolerate some shade. Water deeply once a week so that the roots grow "
          "down instead of spreading near the surface.")
TRAINS = ("The first public railway to use steam locomotives opened in England in 1825. Within two decades "
          "thousands of miles of track crossed the country, and journeys that once took days by coach now took "
          "hours. Railways changed how people thought about distance and time, and towns along the lines adopted a "
          "single standard clock so that timetables could be trusted.")
PROOFS = ("A proof by induction has two parts. First you show that the statement holds for the smallest case, "
          "usually zero. Then you assume it holds for some number n and show that it must also hold for n "
          "plus one. Together these steps cover every natural number, much like a row of dominoes where each one "
          "knocks over the next.")


def one_word_changed(text: str, index: int, replacement: str) -> str:
    words = text.split()
    assert words[index] != replacement
    words[index] = replacement
    return " ".join(words)


def test_the_golden_paragraphs_are_sixty_words_and_far_apart():
    assert [len(t.split()) for t in (GARDEN, TRAINS, PROOFS)] == [60, 60, 60]
    assert near_duplicate_mask([GARDEN, TRAINS, PROOFS]) == [False, False, False]


def test_exact_duplicates_and_formatting_only_changes_are_dropped():
    shouted = GARDEN.upper().replace(",", "").replace(" ", "  \n")
    assert near_duplicate_mask([GARDEN, GARDEN, shouted]) == [False, True, True]


@pytest.mark.parametrize("index", [5, 30, 55])
def test_one_word_changed_in_a_sixty_word_paragraph_is_a_near_duplicate(index):
    # 5-word shingles: one changed word alters at most 5 of 56, Jaccard >= 51/61 = 0.84
    assert near_duplicate_mask([TRAINS, one_word_changed(TRAINS, index, "bicycle")]) == [False, True]


def test_a_rewritten_half_is_not_a_near_duplicate():
    words = GARDEN.split()
    half = " ".join(words[:30] + PROOFS.split()[30:])
    assert near_duplicate_mask([GARDEN, half]) == [False, False]


def test_the_first_of_each_cluster_is_kept_in_order():
    near_trains = one_word_changed(TRAINS, 30, "bicycle")
    near_garden = one_word_changed(GARDEN, 20, "rake")
    texts = [near_trains, GARDEN, TRAINS, PROOFS, near_garden, TRAINS]
    assert near_duplicate_mask(texts) == [False, False, True, False, True, True]
    assert near_duplicate_mask(texts[::-1]) == [False, False, False, True, True, True]


def test_texts_shorter_than_one_shingle_compare_as_a_whole():
    assert shingles("Hello, world!", 5) == {"hello world"}
    assert shingles("  ...  ", 5) == set()
    assert near_duplicate_mask(["Hello, world!", "hello   WORLD", "hello there", "", " !? "]) == \
        [False, True, False, False, True]


def test_normalise_lowercases_strips_punctuation_and_collapses_whitespace():
    assert normalise("  Don't\tSTOP -- now!\n") == ["dont", "stop", "now"]


def test_the_streaming_filter_adds_only_what_is_new():
    f = NearDuplicateFilter()
    assert not f.is_duplicate(PROOFS)
    assert len(f) == 0  # asking does not add
    assert f.add("proofs", PROOFS)
    assert f.is_duplicate(one_word_changed(PROOFS, 30, "triangle"))
    assert not f.add("proofs-again", PROOFS)
    assert f.add("trains", TRAINS)
    assert len(f) == 2
    with pytest.raises(ValueError, match="already added"):
        f.add("trains", GARDEN)


def test_a_lower_threshold_catches_looser_copies():
    words = GARDEN.split()
    five_changed = " ".join("weed" if i % 12 == 6 else w for i, w in enumerate(words))
    assert near_duplicate_mask([GARDEN, five_changed]) == [False, False]
    assert near_duplicate_mask([GARDEN, five_changed], threshold=0.2, shingle_words=2) == [False, True]


def test_bad_settings_fail_with_their_name():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateFilter(threshold=1.5)
    with pytest.raises(ValueError, match="shingle_words"):
        NearDuplicateFilter(shingle_words=0)
