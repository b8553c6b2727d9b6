"""polylm-tokenizer: training from text and JSONL with language weights, and the compression
report."""

import csv
import json

import pytest

from polylm_jax.data import sample, tokenizer, tokenizer_cli


def test_train_from_text_and_jsonl_with_weights(tmp_path):
  (tmp_path / "th.jsonl").write_text(
    "\n".join(json.dumps({"body": line}) for line in sample.sample_lines("th")), "utf-8"
  )
  out = tmp_path / "tok.model"
  assert (
    tokenizer_cli.main(
      [
        "train",
        f"--input=en={sample.sample_path('en')}",
        f"--input=th={tmp_path / 'th.jsonl'}",
        "--text_field=body",
        "--weight=th=3",
        "--vocab_size=700",
        f"--out={out}",
      ]
    )
    == 0
  )
  sp = tokenizer.load(out)
  assert sp.vocab_size() == 700
  assert [sp.id_to_piece(i) for i in sp.encode("907")] == ["9", "0", "7"]
  for text in (sample.sample_lines("th")[5], "ok 🧪 ሰላም", sample.sample_lines("ja")[0]):
    assert sp.decode(sp.encode(text)) == text  # byte fallback: lossless for unseen scripts too
  with pytest.raises(SystemExit, match="'nothing/\\*.txt' matches no file"):
    tokenizer_cli.main(
      ["train", "--input=en=nothing/*.txt", "--vocab_size=300", f"--out={tmp_path / 'x.model'}"]
    )


def test_report_compares_two_models_per_language(tmp_path, capsys):
  small = tokenizer.train(
    {lang: sample.sample_lines(lang) for lang in ("en", "de", "fr", "es")},
    tmp_path / "small.model",
    500,
    hard_vocab_limit=False,
  )
  csv_path = tmp_path / "report.csv"
  assert (
    tokenizer_cli.main(
      [
        "report",
        f"--model={sample.TOKENIZER_MODEL}",
        f"--model={small}",
        f"--dir={sample.SAMPLE_DIR}",
        f"--csv={csv_path}",
      ]
    )
    == 0
  )
  table = capsys.readouterr().out
  rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
  assert sorted(r["language"] for r in rows) == sorted(sample.LANGUAGES)
  by_lang = {r["language"]: r for r in rows}
  assert float(by_lang["en"]["ratio_to_en_0"]) == 1.0
  # The Latin-only model splits Thai into byte pieces: more tokens per sentence, fewer bytes each.
  assert float(by_lang["th"]["tokens_per_sentence_1"]) > 2 * float(
    by_lang["th"]["tokens_per_sentence_0"]
  )
  assert float(by_lang["th"]["bytes_per_token_1"]) < float(by_lang["th"]["bytes_per_token_0"])
  assert "vs en[1]" in table and len(table.splitlines()) == 3 + 18


def test_weights_up_sample_and_balancing_evens_out_the_languages(tmp_path, capsys):
  texts = {lang: sample.parallel_lines(lang) for lang in ("en", "ru", "de")}
  plain = tokenizer.weighted_sentences(texts)
  assert len(plain) == 300
  doubled = tokenizer.weighted_sentences(texts, {"ru": 2.0, "de": 0.5})
  assert doubled.count(texts["ru"][3]) == 2 and 25 <= sum(s in texts["de"] for s in doubled) <= 75
  # Up-weighting a language buys it vocabulary: fewer tokens per sentence, even on a corpus
  # smaller than any sentence budget.
  tps = {}
  for w in (1.0, 4.0):
    model = tokenizer.train_model(texts, 800, weights={"ru": w}, hard_vocab_limit=False)
    sp = __import__("sentencepiece").SentencePieceProcessor(model_proto=model)
    tps[w] = tokenizer.tokens_per_sentence(sp, texts["ru"])
  assert tps[4.0] < tps[1.0]
  # balance: from the CLI, on a parallel dev set (the sample is parallel), weights saved.
  dev = tmp_path / "dev"
  dev.mkdir()
  for lang, lines in texts.items():
    (dev / f"{lang}.txt").write_text("\n".join(lines[:50]), "utf-8")
  args = [
    "balance",
    f"--dev_dir={dev}",
    "--vocab_size=800",
    "--target=1.05",
    f"--out={tmp_path / 'bal.model'}",
    "--iterations=4",
  ]
  args += [f"--input={lang}={sample.sample_path(lang)}" for lang in texts]
  assert tokenizer_cli.main(args) == 0
  record = json.loads((tmp_path / "bal.model.balance.json").read_text())
  first, last = record["iterations"][0], record["iterations"][-1]
  assert last["ratios"][last["worst"]] < first["ratios"][first["worst"]]
  assert record["weights"][first["worst"]] > 1.0
  assert "balance 0: worst" in capsys.readouterr().out
  sp = tokenizer.load(tmp_path / "bal.model")
  assert all(sp.decode(sp.encode(s)) == s for lines in texts.values() for s in lines)


def test_token_bytes_count_a_texts_own_bytes_and_say_when_they_cannot(tmp_path):
  """val_bpb's byte count: summed over a text's tokens, its UTF-8 bytes (the sample tokenizer
  is lossless); a tokenizer with a dummy prefix and NFKC folding is recognised as not."""
  import sentencepiece as spm

  from polylm_jax.data import sample
  from polylm_jax.data import tokenizer as tok

  sp = tok.load(sample.TOKENIZER_MODEL)
  table = tok.token_bytes(sp, size=sp.vocab_size() + 10)
  assert tok.bytes_exact(sp) and table[-10:].sum() == 0 and table[[0, 1, 2]].sum() == 0
  for lang in sample.LANGUAGES:
    for line in sample.sample_lines(lang, "validation")[:30]:
      assert table[sp.encode(line)].sum() == len(line.encode("utf-8")), (lang, line)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sample.sample_lines("en") * 3),
    model_prefix=str(tmp_path / "default"),
    vocab_size=300,
    num_threads=1,
  )
  assert not tok.bytes_exact(tok.load(tmp_path / "default.model"))
