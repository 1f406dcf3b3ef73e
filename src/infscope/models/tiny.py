"""Tiny models built from a config, for tests and quick runs that must work offline in seconds.

``tiny-llama`` (a 2-layer Llama causal LM) and ``tiny-bert`` (a 2-layer BERT encoder) share a
byte-level BPE tokenizer trained here with the ``tokenizers`` library on a fixed built-in corpus of
common English words, digits, punctuation and the prompt template words. Byte-level BPE encodes any
text without unknown tokens, so every dataset works, just with more tokens for rare words. Weights
are drawn from a seeded initialisation, so the same seed always gives the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Common English words plus the words of the Alpaca-style prompt template; the order is fixed so
# the trained tokenizer is the same on every machine.
_WORDS = """
the a an of to and in is it that for on with as was be by at this are from or have not but
they his her their we you he she i me my our your its them us what which who whom whose when where
why how all any both each few more most other some such no nor only own same so than too very can
will just should now one two three four five six seven eight nine ten hundred thousand million first
second third last next new old good bad great small large big long short high low right left early
late young important public private able best better sure free full special clear whole real true
false easy hard strong weak happy sad hot cold warm cool dark light red blue green yellow black white
brown orange purple pink gray time year people way day man woman child children world life hand part
place case week company system program question work government number night point home water room
mother father area money story fact month lot study book eye job word business issue side kind head
house service friend power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class
control care field development role effort rate heart drug show leader light voice wife police mind
price report decision son view relationship town road arm difference thing food dog cat bird fish
tree sun moon star sky sea river mountain school student language sentence paragraph text letter
say said says get got make made go went gone know knew think thought take took see saw come came
want look use used find found give gave tell told ask asked seem feel try leave call keep let begin
help talk turn start show hear play run move like live believe hold bring happen write wrote read
provide sit stand lose pay meet include continue set learn lead understand watch follow stop create
speak allow add spend grow open walk win offer remember love consider appear buy wait serve die send
expect build stay fall cut reach kill remain suggest raise pass sell require decide return explain
hope develop carry break receive agree support hit produce eat cover catch draw choose rewrite
translate summarize classify describe list convert correct answer solve calculate generate identify
compare edit improve shorten expand simplify reverse sort count replace remove capitalize uppercase
lowercase plural singular past present future tense active passive voice positive negative neutral
sentiment formal informal synonym antonym opposite meaning grammar spelling error errors mistake
below above instruction instructions input output response task tasks request context appropriately
completes describes paired provides further write that an the following given example examples
label category topic sports politics science technology entertainment weather finance travel news
plus minus times divided equals equal sum difference product total step steps therefore because
then if else while after before during between into through over under again once here there
about against up down out off yes also well even back still however never always often sometimes
usually quickly slowly happily sadly loudly quietly carefully easily really almost already
"""

_EXTRA = "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 1000 . , ! ? ; : ' \" ( ) [ ] - + * / = % $ # @ & \n ###"

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
VOCAB_SIZE = 2048
TINY_VERSION = 1  # bump when the corpus, tokenizer or configs change, so stale caches are not reused


def _corpus() -> list[str]:
    """The fixed training corpus: each word alone, capitalised, and in template sentences."""
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() for w in words]
    lines += [f"{w}." for w in words] + [f"{w}," for w in words]
    lines += [" ".join(words[i::7]) for i in range(7)] * 2  # every word after a space, twice more
    lines.append(_EXTRA)
    lines.append(
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n\n### Input:\n\n### Response:\n"
    )
    return lines


def build_tokenizer(kind: str) -> Any:
    """Train the shared byte-level BPE tokenizer and wrap it for ``kind`` ("llama" or "bert")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="[MASK]",
    )


def build_tiny_llama(out_dir: Path, seed: int) -> dict[str, Any]:
    """Write a seeded 2-layer Llama causal LM (hidden 128, 4 heads) and its tokenizer to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"builder": "tiny-llama", "seed": seed}


def build_tiny_bert(out_dir: Path, seed: int) -> dict[str, Any]:
    """Write a seeded 2-layer BERT encoder (hidden 128, 4 heads) and its tokenizer to ``out_dir``.

    Only the encoder is saved: a classification head is created (seeded) when the model is loaded
    with the number of labels the dataset needs.
    """
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer("bert")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"builder": "tiny-bert", "seed": seed}
