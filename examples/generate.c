/* generate.c — generate from token ids with a g4c artifact's C runtime.
 *
 *   cc generate.c -o generate $(PKG_CONFIG_PATH=ART/lib/pkgconfig pkg-config --cflags --libs g4c)
 *   ./generate ART 2,17,99 16                 # 16 new tokens after the prompt 2,17,99 (greedy)
 *   ./generate ART 2,17,99 16 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1 --threads 2
 *   ./generate ART 2,17,99 16 --chunk 8 --max-context 1024 --ignore-eos
 *
 * Prints the new ids comma-separated on stdout (a line per token as they come with --stream) and the
 * load time and speed on stderr; --logits FILE writes the prompt's last-token logits (float32, raw).
 * Exit status 1 with g4c's one-line message when anything fails.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "g4c.h"
#include "g4c_model.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int fail(const char *what) {
  fprintf(stderr, "generate: %s: %s\n", what, g4c_last_error());
  return 1;
}

static int parse_ids(const char *text, int32_t *ids, int capacity) {
  int n = 0;
  for (const char *p = text; *p && n < capacity;) {
    char *end;
    long v = strtol(p, &end, 10);
    if (end == p) return -1;
    ids[n++] = (int32_t)v;
    p = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return -1;
  }
  return n;
}

static int print_token(int32_t token, void *user_data) {
  (void)user_data;
  fprintf(stdout, "%d\n", token);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s ARTIFACT_DIR IDS [MAX_NEW] [--threads N] [--max-context N] [--temperature T] "
                    "[--top-k K] [--top-p P] [--seed S] [--chunk N] [--logits FILE] [--stream] [--ignore-eos] [--no-verify]\n", argv[0]);
    return 2;
  }
  g4c_options options = g4c_default_options();
  g4c_sampler sampler = g4c_default_sampler();
  const char *logits_path = NULL;
  int max_new = 16, stream = 0, ignore_eos = 0;
  for (int i = 3; i < argc; ++i) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--stream")) { stream = 1; continue; }
    if (!strcmp(a, "--ignore-eos")) { ignore_eos = 1; continue; }
    if (!strcmp(a, "--no-verify")) { options.verify = 0; continue; }  /* sizes only, not SHA-256 */
    if (a[0] != '-') { max_new = atoi(a); continue; }
    if (!v) { fprintf(stderr, "generate: %s needs a value\n", a); return 2; }
    ++i;
    if (!strcmp(a, "--threads")) options.n_threads = atoi(v);
    else if (!strcmp(a, "--max-context")) options.max_context = atoi(v);
    else if (!strcmp(a, "--chunk")) options.prefill_chunk = atoi(v);
    else if (!strcmp(a, "--temperature")) sampler.temperature = (float)atof(v);
    else if (!strcmp(a, "--top-k")) sampler.top_k = atoi(v);
    else if (!strcmp(a, "--top-p")) sampler.top_p = (float)atof(v);
    else if (!strcmp(a, "--seed")) sampler.seed = strtoull(v, NULL, 10);
    else if (!strcmp(a, "--logits")) logits_path = v;
    else { fprintf(stderr, "generate: unknown option %s\n", a); return 2; }
  }
  int32_t ids[4096];
  int n_ids = parse_ids(argv[2], ids, 4096);
  if (n_ids <= 0) { fprintf(stderr, "generate: IDS must be comma-separated integers\n"); return 2; }

  double t0 = now();
  g4c_session *session;
  if (g4c_open_with(argv[1], &options, &session) != G4C_OK) return fail("open");
  double t1 = now();
  fprintf(stderr, "%s · %s artifact, vocabulary %d · loaded in %.0f ms\n", g4c_version(), G4C_MODEL_TARGET,
          g4c_vocab_size(session), (t1 - t0) * 1e3);

  int vocab = g4c_vocab_size(session);
  float *logits = malloc(sizeof(float) * vocab);
  int32_t *out = malloc(sizeof(int32_t) * (max_new > 0 ? max_new : 1));
  int n_out = 0, status = G4C_OK;
  uint64_t rng = sampler.seed;
  /* prefill, then sample and decode: what g4c_generate does, timed step by step */
  double t2 = now();
  if ((status = g4c_prefill(session, ids, n_ids, logits)) == G4C_OK && logits_path) {
    FILE *f = fopen(logits_path, "wb");
    if (!f || fwrite(logits, sizeof(float), vocab, f) != (size_t)vocab) {
      fprintf(stderr, "generate: cannot write %s\n", logits_path);
      status = -1;
    }
    if (f) fclose(f);
  }
  double t3 = now(), decode_seconds = 0;
  while (status == G4C_OK && n_out < max_new) {
    int32_t token;
    if ((status = g4c_sample(&sampler, logits, vocab, &rng, &token)) != G4C_OK) break;
    out[n_out++] = token;
    if (stream) print_token(token, NULL);
    if ((!ignore_eos && g4c_is_eos(session, token)) || n_out == max_new) break;
    if (g4c_position(session) >= g4c_max_context(session)) { fprintf(stderr, "generate: context full\n"); break; }
    double t = now();
    if ((status = g4c_decode(session, token, logits)) != G4C_OK) break;
    decode_seconds += now() - t;
  }
  if (status == G4C_OK) fprintf(stderr, "prefill %d tokens: %.1f tok/s · decode: %.1f tok/s (%d steps)\n", n_ids, n_ids / (t3 - t2),
          n_out > 1 ? (n_out - 1) / decode_seconds : 0.0, n_out > 1 ? n_out - 1 : 0);
  if (status == G4C_OK && !stream) {
    for (int i = 0; i < n_out; ++i) printf(i ? ",%d" : "%d", out[i]);
    printf("\n");
  }
  if (status > 0) fprintf(stderr, "generate: %s\n", g4c_last_error());
  free(out);
  free(logits);
  g4c_close(session);
  return status == G4C_OK ? 0 : 1;
}
