// gen_bpe_fixtures.mjs - expected GPT-2 token ids for tests/unit/test_tokenizer.c,
// from an encoder independent of tallyd's: the npm package gpt-tokenizer (MIT),
// encoding r50k_base (GPT-2's vocabulary and merges, as tiktoken ships them).
//
// Run once by hand; the output is committed as tests/data/gpt2/fixtures.json:
//   mkdir /tmp/gt && cd /tmp/gt && npm install gpt-tokenizer@4
//   NODE_PATH=/tmp/gt/node_modules node tests/tools/gen_bpe_fixtures.mjs > tests/data/gpt2/fixtures.json
// (an ES module resolves packages from the script's folder upwards, so run it
// from a copy placed in /tmp/gt if NODE_PATH is ignored.)
//
// Each case is the UTF-8 bytes of a text (hex, so that invalid UTF-8 can be
// given) and the ids. Invalid bytes are first decoded with replacement
// (TextDecoder, each maximal invalid subsequence -> U+FFFD), which is what
// tallyd's encoder does with text that is not valid UTF-8.
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import path from 'node:path';

const base = process.env.NODE_PATH ? process.env.NODE_PATH.split(':')[0] : path.resolve('node_modules');
const mod = await import(pathToFileURL(path.join(base, 'gpt-tokenizer/esm/encoding/r50k_base.js')).href);
const { encode } = mod;
void createRequire;

const u = (s) => Buffer.from(s, 'utf8');
const cases = [
  ['ascii', u('Hello world! This is a test of the tokenizer.')],
  ['contractions', u("I'm sure you'll see they've said it's what we'd do, isn't it? DON'T SHOUT'S")],
  ['digits', u('In 2026 there were 1234567 requests, 3.14159 and 0x1F, 42nd.')],
  ['spaces', u('a  b   c    d\t\te  \n  f     ')],
  ['newlines', u('line one\nline two\n\n\nline five\r\n\r\nend\n')],
  ['only_spaces', u('          ')],
  ['accented', u('Café naïve résumé Ångström Øresund ßtraße ÉCOLE')],
  ['cjk', u('日本語のテキストと中文文本，以及한국어 텍스트。')],
  ['emoji', u('smile 😀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 heart ❤️ thumbs 👍🏽')],
  ['mixed', u('def f(x):\n    return x**2  # square\n\n>>> f(3)\n9\n')],
  ['punct', u('...!!!??? --- *** ((())) [[]] {{}} <<<>>> @@@ ### $$$ %%% ^^^ &&&')],
  ['symbols', u('→ ∑ ∞ ≤ ≥ ± × ÷ € £ ¥ © ® ™ § ¶ • … — –')],
  ['long_word', u('Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism')],
  ['long_spaces', u(' '.repeat(300) + 'x')],
  ['empty', u('')],
  ['invalid_utf8', Buffer.from([0x61, 0xff, 0x62, 0xc3, 0x28, 0x63, 0xe2, 0x82, 0x64, 0xf0, 0x9f, 0x98, 0x20, 0xed, 0xa0, 0x80, 0x65])],
  ['long_letters', u('ab'.repeat(1500))],
  ['long_digits', u('9'.repeat(999))],
  ['invalid_tail', Buffer.from([0x68, 0x69, 0xe6, 0x97])],
];
const out = [];
for (const [name, bytes] of cases) {
  const text = new TextDecoder('utf-8').decode(bytes);
  out.push({ name, hex: bytes.toString('hex'), allow_special: false, ids: encode(text) });
}
// A special token written in the text: gpt-tokenizer's r50k_base export
// encodes "<|endoftext|>" as ordinary text even when allowed, so the expected
// ids are built as Hugging Face's tokenizers build them: the text between
// special tokens encoded alone, and 50256 for each special token.
const sp = ['Hello', null, ' world', null, null, '\n'];
out.push({ name: 'special', hex: u(sp.map((s) => s ?? '<|endoftext|>').join('')).toString('hex'),
           allow_special: true, ids: sp.flatMap((s) => (s === null ? [50256] : encode(s))) });
process.stdout.write(JSON.stringify({ source: 'gpt-tokenizer r50k_base', cases: out }, null, 1) + '\n');
