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
 *
 * Images and audio (artifacts of a multimodal checkpoint: g4c_get_media_info says which): the app
 * preprocesses each image as transformers' Gemma 4 image processor does (its pixel_values rows and
 * (x, y) positions, padding rows left out), g4c_encode_image turns it into soft-token rows [S, hidden],
 * the app expands the prompt as Gemma4Processor does (boi, S image tokens, eoi in place of the
 * placeholder) and copies the rows to the image tokens' positions, then g4c_prefill_media runs it:
 *
 *   g4c_media_info m; g4c_get_media_info(s, &m);
 *   float *rows = malloc(sizeof(float) * m.max_soft_tokens * m.hidden_size); int n_rows;
 *   g4c_encode_image(s, pixel_values, patch_xy, n_patches, rows, m.max_soft_tokens, &n_rows);
 *   ... ids = text, boi, n_rows × image_token_id, eoi, text; soft = [n_ids, hidden], rows at the image tokens
 *   g4c_prefill_media(s, ids, n_ids, soft, NULL, logits);   then g4c_decode as usual
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

#define G4C_API_VERSION 2  /* 2: images and audio (g4c_get_media_info, g4c_encode_*, g4c_prefill_media) */

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

/* what a multimodal artifact takes (g4c_get_media_info; a text-only artifact: has_image = has_audio = 0, ids -1)
 * and the preprocessing settings of its checkpoint (g4c_processor_config has them all, as JSON) */
typedef struct g4c_media_info {
  int has_image, has_audio;   /* the artifact has an image / audio encoder */
  int hidden_size;            /* floats per soft-token row (g4c_encode_* writes, g4c_prefill_media reads) */
  int bidirectional_vision;   /* an image's soft tokens attend to their whole block (the runtime handles it) */
  int32_t image_token_id, boi_token_id, eoi_token_id;  /* placeholder / soft token, begin, end of an image */
  int32_t audio_token_id, boa_token_id, eoa_token_id;  /* ... of an audio clip; -1: none */
  int32_t pad_token_id;       /* what the runtime feeds the per-layer embeddings at soft positions */
  /* image processor (transformers' Gemma4ImageProcessor; 0 without one) */
  int patch_size;             /* p: one pixel_values row is a p×p patch, 3·p·p floats (y, x, channel order) */
  int pooling_kernel_size;    /* k: k×k patches make one soft token; images are multiples of k·p pixels */
  int max_soft_tokens;        /* soft tokens of one image at most; patches at most max_soft_tokens·k·k */
  int do_resize, resample, do_rescale, do_normalize, do_convert_rgb;  /* resample: a PIL filter number */
  double rescale_factor;
  float image_mean[3], image_std[3];
  /* audio feature extractor (Gemma4AudioFeatureExtractor; 0 without one) */
  int sampling_rate, n_mels, frame_length, hop_length, fft_length, max_length;  /* lengths in samples */
  float min_frequency, max_frequency, mel_floor;
  int audio_seq_length;       /* soft tokens of one clip at most */
} g4c_media_info;

/* called with each new token; return nonzero to stop generation */
typedef int (*g4c_token_callback)(int32_t token, void *user_data);

G4C_API const char *g4c_version(void);          /* "g4c <version> (api 2)" */
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

/* images and audio (G4C_ERR_ARGUMENT on a text-only artifact or one without that encoder) */
G4C_API int g4c_hidden_size(const g4c_session *s);                     /* floats per soft-token row */
G4C_API int g4c_get_media_info(const g4c_session *s, g4c_media_info *out);  /* fills *out; any artifact */
G4C_API const char *g4c_processor_config(const g4c_session *s);       /* the processor settings as JSON ("{}": none) */
/* one preprocessed image → its soft-token rows. pixel_values [n_patches, 3·p·p]: transformers' pixel_values
 * rows of the image (values after rescale/normalize), padding rows left out; patch_xy [n_patches, 2]: their
 * (x, y) patch positions (image_position_ids), covering a grid of W×H patches, W and H multiples of k. The
 * runtime makes the encoder's inputs (2·(pixel_values − 0.5), positions, pooling). rows_out [max_rows,
 * hidden_size] receives S = n_patches / (k·k) rows; *n_rows = S, set even when S > max_rows (an error). */
G4C_API int g4c_encode_image(g4c_session *s, const float *pixel_values, const int32_t *patch_xy, int n_patches,
                             float *rows_out, int max_rows, int *n_rows);
/* one audio clip → its soft-token rows. features [n_frames, n_mels]: the feature extractor's log-mel frames of
 * the clip whose input_features_mask is 1 (padding frames left out). *n_rows = ceil(ceil(n_frames/2)/2), at
 * most audio_seq_length, set even when it exceeds max_rows (an error). */
G4C_API int g4c_encode_audio(g4c_session *s, const float *features, int n_frames, float *rows_out, int max_rows,
                             int *n_rows);
/* a prompt with soft tokens, after the cached ones: ids expanded as Gemma4Processor does (boi, image_token_id ×
 * rows, eoi per image; boa, audio_token_id × rows, eoa per clip); soft_rows [n_ids, hidden_size]: the encoders'
 * rows at the positions of image/audio tokens (other rows are not read; NULL when there are none); soft_mask
 * [n_ids]: NULL, or 1 exactly at those positions (checked). The runtime puts pad_token_id at soft positions,
 * lets an image's tokens see their whole block (bidirectional_vision) and never splits an image block across
 * prefill chunks. logits: of the last id [vocab]; continue with g4c_decode. */
G4C_API int g4c_prefill_media(g4c_session *s, const int32_t *ids, int n_ids, const float *soft_rows,
                              const uint8_t *soft_mask, float *logits);

#ifdef __cplusplus
}
#endif
#endif /* G4C_H */
