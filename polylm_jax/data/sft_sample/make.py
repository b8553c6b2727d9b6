"""Writes the embedded instruction-tuning sample (`<lang>.jsonl`) from the embedded parallel
corpus: translation instructions into and out of English in PolyLM-MultiAlpaca's 11 languages, in
MultiAlpaca's record format. Run from the repository root: python polylm_jax/data/sft_sample/make.py
"""

import json
import pathlib

from polylm_jax.data import sample

# (instruction: into English, instruction: from English into the language), written for this file.
TEMPLATES = {
    "ar": ("ترجم الجملة التالية إلى الإنجليزية.", "ترجم الجملة الإنجليزية التالية إلى العربية."),
    "de": ("Übersetze den folgenden Satz ins Englische.",
           "Übersetze den folgenden englischen Satz ins Deutsche."),
    "es": ("Traduce la siguiente oración al inglés.",
           "Traduce la siguiente oración en inglés al español."),
    "fr": ("Traduis la phrase suivante en anglais.", "Traduis la phrase anglaise suivante en français."),
    "id": ("Terjemahkan kalimat berikut ke dalam bahasa Inggris.",
           "Terjemahkan kalimat bahasa Inggris berikut ke dalam bahasa Indonesia."),
    "ja": ("次の文を英語に翻訳してください。", "次の英語の文を日本語に翻訳してください。"),
    "ko": ("다음 문장을 영어로 번역하세요.", "다음 영어 문장을 한국어로 번역하세요."),
    "pt": ("Traduza a seguinte frase para o inglês.",
           "Traduza a seguinte frase em inglês para o português."),
    "ru": ("Переведите следующее предложение на английский язык.",
           "Переведите следующее английское предложение на русский язык."),
    "th": ("แปลประโยคต่อไปนี้เป็นภาษาอังกฤษ", "แปลประโยคภาษาอังกฤษต่อไปนี้เป็นภาษาไทย"),
    "vi": ("Dịch câu sau sang tiếng Anh.", "Dịch câu tiếng Anh sau sang tiếng Việt."),
}


def records(lang: str) -> list[dict]:
  into_en, from_en = TEMPLATES[lang]
  out = []
  for mine, english in zip(sample.sample_lines(lang), sample.sample_lines("en")):
    out.append({"instruction": into_en, "input": mine, "output": english})
    out.append({"instruction": from_en, "input": english, "output": mine})
  return out


if __name__ == "__main__":
  here = pathlib.Path(__file__).parent
  for lang in TEMPLATES:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(lang))
    (here / f"{lang}.jsonl").write_text(text, encoding="utf-8")
