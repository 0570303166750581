/* embed_checks.c — drives an artifact's C runtime for tests/test_embed.py:
 *
 *   embed_checks lifecycle ART IDS          open → prefill → 32 decodes → reset → close, twice; prints each
 *                                           cycle's tokens (the two lines must be equal)
 *   embed_checks threads ART IDS N          two sessions in two threads, N greedy tokens each, then the same
 *                                           one after the other; prints the four token lines
 *   embed_checks bad ART OTHER              one line per bad input: "<case> <code> <message>"
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "g4c.h"

static int parse_ids(const char *text, int32_t *ids) {
  int n = 0;
  for (const char *p = text; *p;) {
    ids[n++] = (int32_t)strtol(p, (char **)&p, 10);
    if (*p == ',') ++p;
  }
  return n;
}

static void print_tokens(const int32_t *tokens, int n) {
  for (int i = 0; i < n; ++i) printf(i ? ",%d" : "%d", tokens[i]);
  printf("\n");
}

static int greedy(g4c_session *s, const int32_t *ids, int n_ids, int n_new, int32_t *out) {
  int n_out = 0;
  g4c_sampler sampler = g4c_default_sampler();
  int status = g4c_generate(s, ids, n_ids, n_new, &sampler, NULL, NULL, out, &n_out);
  return status == G4C_OK && n_out == n_new ? 0 : -1;
}

static int lifecycle(const char *dir, const int32_t *ids, int n_ids) {
  for (int cycle = 0; cycle < 2; ++cycle) {
    g4c_session *s = NULL;
    if (g4c_open(dir, &s) != G4C_OK) return fprintf(stderr, "open: %s\n", g4c_last_error()), 1;
    float *logits = malloc(sizeof(float) * g4c_vocab_size(s));
    int32_t tokens[33];
    for (int round = 0; round < 2; ++round) {  /* the second round runs after a reset */
      if (g4c_prefill(s, ids, n_ids, logits) != G4C_OK) return fprintf(stderr, "prefill: %s\n", g4c_last_error()), 1;
      tokens[0] = g4c_argmax(logits, g4c_vocab_size(s));
      for (int i = 0; i < 32; ++i) {
        if (g4c_decode(s, tokens[i], logits) != G4C_OK) return fprintf(stderr, "decode: %s\n", g4c_last_error()), 1;
        tokens[i + 1] = g4c_argmax(logits, g4c_vocab_size(s));
      }
      print_tokens(tokens, 33);
      g4c_reset(s);
    }
    free(logits);
    g4c_close(s);
  }
  return 0;
}

typedef struct {
  const char *dir;
  const int32_t *ids;
  int n_ids, n_new, status;
  int32_t out[256];
} job;

static void *run_job(void *arg) {
  job *j = arg;
  g4c_session *s = NULL;
  j->status = g4c_open(j->dir, &s);
  if (j->status == G4C_OK) {
    j->status = greedy(s, j->ids, j->n_ids, j->n_new, j->out);
    g4c_close(s);
  }
  return NULL;
}

static int threads(const char *dir, const int32_t *ids, int n_ids, int n_new) {
  job jobs[4];
  for (int i = 0; i < 4; ++i) jobs[i] = (job){dir, ids, n_ids, n_new > 256 ? 256 : n_new, 0, {0}};
  pthread_t t[2];
  for (int i = 0; i < 2; ++i) pthread_create(&t[i], NULL, run_job, &jobs[i]);
  for (int i = 0; i < 2; ++i) pthread_join(t[i], NULL);
  run_job(&jobs[2]);
  run_job(&jobs[3]);
  for (int i = 0; i < 4; ++i) {
    if (jobs[i].status != 0) return fprintf(stderr, "job %d failed: %s\n", i, g4c_last_error()), 1;
    print_tokens(jobs[i].out, jobs[i].n_new);
  }
  return 0;
}

static void report(const char *name, int code) {
  printf("%s %d %s\n", name, code, code == G4C_OK ? "ok" : g4c_last_error());
}

static int bad(const char *dir, const char *other) {
  g4c_session *s = NULL;
  float logits[1];
  int32_t id = 1, out[4];
  int n_out;
  report("missing", g4c_open("/nonexistent/g4c-artifact", &s));
  report("other", g4c_open(other, &s));
  report("null_dir", g4c_open(NULL, &s));
  report("null_out", g4c_open(dir, NULL));
  g4c_options options = g4c_default_options();
  options.max_context = -1;
  report("bad_options", g4c_open_with(dir, &options, &s));
  options = g4c_default_options();
  options.max_context = 8;
  if (g4c_open_with(dir, &options, &s) != G4C_OK) return fprintf(stderr, "open: %s\n", g4c_last_error()), 1;
  float *full = malloc(sizeof(float) * g4c_vocab_size(s));
  int32_t ids[10] = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  int32_t outside[2] = {2, g4c_vocab_size(s)};
  int32_t negative[1] = {-5};
  report("token_too_large", g4c_prefill(s, outside, 2, full));
  report("token_negative", g4c_prefill(s, negative, 1, full));
  report("past_context", g4c_prefill(s, ids, 10, full));
  report("empty_prompt", g4c_prefill(s, ids, 0, full));
  report("null_ids", g4c_prefill(s, NULL, 3, full));
  report("null_logits", g4c_prefill(s, ids, 3, NULL));
  report("null_session", g4c_prefill(NULL, ids, 3, full));
  report("decode_null", g4c_decode(NULL, id, logits));
  report("decode_outside", g4c_decode(s, g4c_vocab_size(s) + 7, full));
  report("generate_null", g4c_generate(s, NULL, 3, 4, NULL, NULL, NULL, out, &n_out));
  report("still_works", g4c_prefill(s, ids, 8, full));  /* fills the context exactly */
  report("decode_past_context", g4c_decode(s, 3, full));
  g4c_sampler sampler = g4c_default_sampler();
  sampler.top_p = 0;
  uint64_t rng = 0;
  report("bad_sampler", g4c_sample(&sampler, full, g4c_vocab_size(s), &rng, out));
  g4c_reset(NULL);
  g4c_close(NULL);
  printf("null_queries %d %d %d\n", g4c_vocab_size(NULL), g4c_max_context(NULL), g4c_position(NULL));
  free(full);
  g4c_close(s);
  return 0;
}

int main(int argc, char **argv) {
  int32_t ids[4096];
  if (argc >= 4 && !strcmp(argv[1], "lifecycle")) return lifecycle(argv[2], ids, parse_ids(argv[3], ids));
  if (argc >= 5 && !strcmp(argv[1], "threads")) return threads(argv[2], ids, parse_ids(argv[3], ids), atoi(argv[4]));
  if (argc >= 4 && !strcmp(argv[1], "bad")) return bad(argv[2], argv[3]);
  fprintf(stderr, "usage: embed_checks lifecycle|threads|bad ...\n");
  return 2;
}
