"Fixtures several test files share."

import pytest
import torch

from speechllm_course.lm import render, text_documents, train_text_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    "A small BPE tokenizer over SpeechWorld text with the course's special tokens (a fresh one per test module: some tests add tokens)."
    return train_text_tokenizer([render(d) for d in text_documents(400, seed=0)], vocab_size=200)


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models and short clips: one thread is as fast, and immune to OpenMP spin-waits when other work shares the cores."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
