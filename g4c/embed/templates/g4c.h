/* g4c.h — the C API of a g4c artifact's embeddable runtime (libg4c.so).
 *
 * The library next to this header was generated for one compiled artifact and opens that artifact's
 * directory: its kernels, weights (memory-mapped on CPUs), KV-cache plan and PLE table are compiled
 * into it. C99, usable from C++. Every function that can fail returns an int error code (G4C_OK = 0);
 * g4c_last_error() then holds a one-line message for the calling thread.
 *
 *   g4c_session *s;
 *   if (g4c_open("model.g4c", &s) != G4C_OK) { fprintf(stderr, "%s\n", g4c_last_error()); return 1; }
 *   float *logits = malloc(sizeof(float) * g4c_vocab_size(s));
 *   g4c_prefill(s, ids, n_ids, logits);
 *   int32_t next = g4c_argmax(logits, g4c_vocab_size(s));
 *   g4c_decode(s, next, logits);
 *   g4c_close(s);
 *
 * A session is one sequence and is not thread-safe; distinct sessions (of one artifact or several) may
 * run on distinct threads at the same time.
 */
#ifndef G4C_H
#define G4C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define G4C_API __declspec(dllexport)
#else
#define G4C_API __attribute__((visibility("default")))
#endif

#define G4C_API_VERSION 1

/* error codes */
enum {
  G4C_OK = 0,
  G4C_ERR_ARGUMENT = 1,     /* NULL pointer, bad option value, empty prompt */
  G4C_ERR_ARTIFACT = 2,     /* missing, foreign, damaged or modified artifact directory */
  G4C_ERR_TOKEN = 3,        /* a token id outside the vocabulary */
  G4C_ERR_CONTEXT = 4,      /* the prompt would pass the session's max context */
  G4C_ERR_DEVICE = 5,       /* no device, out of device memory, a kernel failure */
  G4C_ERR_MEMORY = 6,       /* out of host memory */
  G4C_ERR_ABORTED = 7       /* a streaming callback asked to stop (not an error: tokens are kept) */
};

typedef struct g4c_session g4c_session;

typedef struct g4c_options {
  int n_threads;    /* CPU threads of the kernels (0: the runtime's default, all cores) */
  int max_context;  /* tokens a session holds (0: min(4096, the model's maximum)) */
  int prefill_chunk;/* prompt tokens run per kernel call (0: 64); sliding rings hold window + chunk - 1 rows */
  int verify;       /* 1: check every artifact file's SHA-256 at open (default); 0: only the manifest's */
} g4c_options;

/* sampling: temperature 0 = greedy (argmax); else softmax(logits / temperature) restricted to the
 * top_k most likely tokens (0 = all), then to the smallest nucleus of mass >= top_p */
typedef struct g4c_sampler {
  float temperature;
  int top_k;
  float top_p;
  uint64_t seed;
} g4c_sampler;

/* called with each new token; return nonzero to stop generation */
typedef int (*g4c_token_callback)(int32_t token, void *user_data);

G4C_API const char *g4c_version(void);          /* "g4c <version> (api 1)" */
G4C_API g4c_options g4c_default_options(void);
G4C_API g4c_sampler g4c_default_sampler(void);  /* greedy */

G4C_API int  g4c_open(const char *artifact_dir, g4c_session **out);  /* 0 = ok; else an error code */
G4C_API int  g4c_open_with(const char *artifact_dir, const g4c_options *options, g4c_session **out);
G4C_API int  g4c_vocab_size(const g4c_session *s);
G4C_API int  g4c_max_context(const g4c_session *s);
G4C_API int  g4c_position(const g4c_session *s);  /* tokens in the KV cache */
G4C_API int  g4c_prefill(g4c_session *s, const int32_t *ids, int n_ids, float *logits); /* logits of the last id */
G4C_API int  g4c_decode(g4c_session *s, int32_t id, float *logits);                     /* one token, KV cache kept */
G4C_API void g4c_reset(g4c_session *s);
G4C_API void g4c_close(g4c_session *s);
G4C_API const char *g4c_last_error(void);  /* message of the calling thread's last failed call */

/* sampling and generation on top of prefill/decode */
G4C_API int32_t g4c_argmax(const float *logits, int n);
G4C_API int g4c_sample(const g4c_sampler *sampler, const float *logits, int n, uint64_t *rng_state, int32_t *out);
/* continue `ids` by up to max_new tokens into out (capacity max_new); *n_out = tokens written. Stops
 * after an EOS id of the model (written), at max_new, when the callback returns nonzero
 * (G4C_ERR_ABORTED), or at the context limit (G4C_ERR_CONTEXT; the tokens so far are kept). */
G4C_API int g4c_generate(g4c_session *s, const int32_t *ids, int n_ids, int max_new, const g4c_sampler *sampler,
                         g4c_token_callback on_token, void *user_data, int32_t *out, int *n_out);
G4C_API int g4c_is_eos(const g4c_session *s, int32_t id);

#ifdef __cplusplus
}
#endif
#endif /* G4C_H */
