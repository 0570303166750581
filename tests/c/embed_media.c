/* embed_media.c — images through an artifact's C runtime, for tests/test_embed_media.py:
 *
 *   embed_media run ART INPUT OUTPUT CHUNK   encode the images and audio clips of INPUT, place their rows at
 *                                            the image / audio tokens of its expanded prompt, g4c_prefill_media,
 *                                            then greedy decoding; writes each image's and clip's rows and the
 *                                            prompt's last logits to OUTPUT and prints the greedy tokens
 *   embed_media bad ART INPUT                one line per bad input: "<case> <code> <message>"
 *   embed_media info ART                     the g4c_media_info fields, one "name value" a line
 *
 * INPUT (little-endian, written by the test): int32 n_images; per image int32 n_patches, int32 row (3·p·p),
 * float32 pixel_values[n_patches·row], int32 patch_xy[n_patches·2]; int32 n_clips; per clip int32 n_frames,
 * int32 n_mels, float32 features[n_frames·n_mels]; int32 n_ids, int32 ids[n_ids] (the prompt expanded as
 * Gemma4Processor does); int32 n_new. OUTPUT: per image, then per clip, int32 n_rows, float32
 * rows[n_rows·hidden]; float32 logits[vocab].
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "g4c.h"

typedef struct {
  int n_patches, row;
  float *pixels;
  int32_t *xy;
} image;

typedef struct {
  int n_frames, n_mels;
  float *features;
} clip;

typedef struct {
  int n_images, n_clips;
  image images[8];
  clip clips[8];
  int n_ids, n_new;
  int32_t *ids;
} input;

static int read_exact(FILE *f, void *out, size_t bytes) { return fread(out, 1, bytes, f) == bytes ? 0 : -1; }

static int read_input(const char *path, input *in) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  int bad = read_exact(f, &in->n_images, 4) || in->n_images < 0 || in->n_images > 8;
  for (int i = 0; !bad && i < in->n_images; ++i) {
    image *im = &in->images[i];
    bad = read_exact(f, &im->n_patches, 4) || read_exact(f, &im->row, 4);
    if (bad) break;
    im->pixels = malloc(sizeof(float) * (size_t)im->n_patches * im->row);
    im->xy = malloc(sizeof(int32_t) * 2 * (size_t)im->n_patches);
    bad = !im->pixels || !im->xy || read_exact(f, im->pixels, sizeof(float) * (size_t)im->n_patches * im->row) ||
          read_exact(f, im->xy, sizeof(int32_t) * 2 * (size_t)im->n_patches);
  }
  if (!bad) bad = read_exact(f, &in->n_clips, 4) || in->n_clips < 0 || in->n_clips > 8;
  for (int i = 0; !bad && i < in->n_clips; ++i) {
    clip *c = &in->clips[i];
    bad = read_exact(f, &c->n_frames, 4) || read_exact(f, &c->n_mels, 4);
    if (bad) break;
    c->features = malloc(sizeof(float) * (size_t)c->n_frames * c->n_mels);
    bad = !c->features || read_exact(f, c->features, sizeof(float) * (size_t)c->n_frames * c->n_mels);
  }
  if (!bad) bad = read_exact(f, &in->n_ids, 4) || in->n_ids <= 0;
  if (!bad) bad = !(in->ids = malloc(sizeof(int32_t) * in->n_ids)) || read_exact(f, in->ids, sizeof(int32_t) * in->n_ids);
  if (!bad) bad = read_exact(f, &in->n_new, 4);
  fclose(f);
  return bad ? -1 : 0;
}

static void free_input(input *in) {
  for (int i = 0; i < in->n_images; ++i) {
    free(in->images[i].pixels);
    free(in->images[i].xy);
  }
  for (int i = 0; i < in->n_clips; ++i) free(in->clips[i].features);
  free(in->ids);
}

/* copy n_rows rows to the next run of `token` ids from *at on */
static int place(const input *in, int32_t token, const float *rows, int n_rows, int hidden, float *soft, int *at) {
  while (*at < in->n_ids && in->ids[*at] != token) ++*at;
  for (int r = 0; r < n_rows; ++r, ++*at) {
    if (*at >= in->n_ids || in->ids[*at] != token) return fprintf(stderr, "%d rows, fewer soft tokens\n", n_rows), -1;
    memcpy(soft + (size_t)*at * hidden, rows + (size_t)r * hidden, sizeof(float) * hidden);
  }
  return 0;
}

/* the app's side of a media prompt: encode each image / clip, copy its rows to its run of soft tokens */
static int soft_rows(g4c_session *s, const input *in, float *soft, FILE *out) {
  g4c_media_info m;
  if (g4c_get_media_info(s, &m) != G4C_OK) return -1;
  const int hidden = m.hidden_size, most = m.max_soft_tokens > m.audio_seq_length ? m.max_soft_tokens : m.audio_seq_length;
  float *rows = malloc(sizeof(float) * (size_t)most * hidden);
  int image_at = 0, audio_at = 0, status = 0;
  for (int i = 0; i < in->n_images + in->n_clips && status == 0; ++i) {
    int n_rows = 0, code;
    if (i < in->n_images) {
      const image *im = &in->images[i];
      code = g4c_encode_image(s, im->pixels, im->xy, im->n_patches, rows, m.max_soft_tokens, &n_rows);
    } else {
      const clip *c = &in->clips[i - in->n_images];
      code = g4c_encode_audio(s, c->features, c->n_frames, rows, m.audio_seq_length, &n_rows);
    }
    if (code != G4C_OK) {
      fprintf(stderr, "encode: %s\n", g4c_last_error());
      status = -1;
      break;
    }
    if (out) {
      fwrite(&n_rows, 4, 1, out);
      fwrite(rows, sizeof(float), (size_t)n_rows * hidden, out);
    }
    status = i < in->n_images ? place(in, m.image_token_id, rows, n_rows, hidden, soft, &image_at)
                              : place(in, m.audio_token_id, rows, n_rows, hidden, soft, &audio_at);
  }
  free(rows);
  return status;
}

static int run(const char *dir, const char *input_path, const char *output_path, int chunk) {
  input in = {0};
  if (read_input(input_path, &in) != 0) return fprintf(stderr, "cannot read %s\n", input_path), 1;
  g4c_options options = g4c_default_options();
  options.prefill_chunk = chunk;
  g4c_session *s = NULL;
  if (g4c_open_with(dir, &options, &s) != G4C_OK) return fprintf(stderr, "open: %s\n", g4c_last_error()), 1;
  const int vocab = g4c_vocab_size(s), hidden = g4c_hidden_size(s);
  float *soft = calloc((size_t)in.n_ids * hidden, sizeof(float)), *logits = malloc(sizeof(float) * vocab);
  int32_t *tokens = malloc(sizeof(int32_t) * (in.n_new + 1));
  FILE *out = fopen(output_path, "wb");
  int status = !out || soft_rows(s, &in, soft, out) != 0;
  if (!status && g4c_prefill_media(s, in.ids, in.n_ids, soft, NULL, logits) != G4C_OK) {
    fprintf(stderr, "prefill_media: %s\n", g4c_last_error());
    status = 1;
  }
  if (!status) fwrite(logits, sizeof(float), vocab, out);
  for (int i = 0; !status && i < in.n_new; ++i) {
    tokens[i] = g4c_argmax(logits, vocab);
    if (i + 1 < in.n_new && g4c_decode(s, tokens[i], logits) != G4C_OK) {
      fprintf(stderr, "decode: %s\n", g4c_last_error());
      status = 1;
    }
  }
  if (!status)
    for (int i = 0; i < in.n_new; ++i) printf(i ? ",%d" : "%d", tokens[i]);
  printf("\n");
  if (out) fclose(out);
  free(soft);
  free(logits);
  free(tokens);
  g4c_close(s);
  free_input(&in);
  return status;
}

static void report(const char *name, int code) { printf("%s %d %s\n", name, code, code ? g4c_last_error() : "ok"); }

static int bad(const char *dir, const char *input_path) {
  input in = {0};
  if (read_input(input_path, &in) != 0 || in.n_images < 1) return fprintf(stderr, "cannot read %s\n", input_path), 1;
  g4c_session *s = NULL;
  if (g4c_open(dir, &s) != G4C_OK) return fprintf(stderr, "open: %s\n", g4c_last_error()), 1;
  g4c_media_info m;
  g4c_get_media_info(s, &m);
  const int hidden = m.hidden_size, vocab = g4c_vocab_size(s);
  const image *im = &in.images[0];
  const int need = im->n_patches / (m.pooling_kernel_size * m.pooling_kernel_size);
  float *rows = malloc(sizeof(float) * (size_t)(m.max_soft_tokens + 1) * hidden), *logits = malloc(sizeof(float) * vocab);
  int n_rows = -1;
  report("rows_too_small", g4c_encode_image(s, im->pixels, im->xy, im->n_patches, rows, need - 1, &n_rows));
  printf("rows_needed %d %d\n", n_rows == need ? 0 : 1, n_rows);
  int32_t *xy = malloc(sizeof(int32_t) * 2 * (size_t)(im->n_patches + 1));
  memcpy(xy, im->xy, sizeof(int32_t) * 2 * (size_t)im->n_patches);
  xy[0] = xy[1] = -1;  /* a padding row of the processor */
  report("padding_row", g4c_encode_image(s, im->pixels, xy, im->n_patches, rows, m.max_soft_tokens, &n_rows));
  memcpy(xy, im->xy, sizeof(int32_t) * 2 * (size_t)im->n_patches);
  report("partial_grid", g4c_encode_image(s, im->pixels, xy, im->n_patches - 1, rows, m.max_soft_tokens, &n_rows));
  xy[2] = xy[0], xy[3] = xy[1];  /* patch 1 at patch 0's position */
  report("same_position", g4c_encode_image(s, im->pixels, xy, im->n_patches, rows, m.max_soft_tokens, &n_rows));
  report("no_patches", g4c_encode_image(s, im->pixels, im->xy, 0, rows, m.max_soft_tokens, &n_rows));
  report("null_rows", g4c_encode_image(s, im->pixels, im->xy, im->n_patches, NULL, m.max_soft_tokens, &n_rows));
  /* audio: 4·audio_seq_length + 1 frames make one soft token too many */
  const int frames = 4 * m.audio_seq_length + 1;
  float *features = calloc((size_t)frames * m.n_mels, sizeof(float)), *audio_rows = malloc(sizeof(float) * (size_t)(m.audio_seq_length + 1) * hidden);
  report("audio_too_long", g4c_encode_audio(s, features, frames, audio_rows, m.audio_seq_length + 1, &n_rows));
  printf("audio_rows_needed %d\n", n_rows);
  report("audio_rows_too_small", g4c_encode_audio(s, features, 9, audio_rows, 2, &n_rows));
  report("no_frames", g4c_encode_audio(s, features, 0, audio_rows, 2, &n_rows));
  report("audio_ok", g4c_encode_audio(s, features, 9, audio_rows, 3, &n_rows));
  free(features), free(audio_rows);
  /* prompts: text, boi, image tokens, eoi */
  const int n = m.max_soft_tokens + 5;  /* 2, boi, max_soft_tokens + 1 image tokens, eoi, 5 */
  int32_t *ids = malloc(sizeof(int32_t) * n);
  uint8_t *mask = calloc(n, 1);
  float *soft = calloc((size_t)n * hidden, sizeof(float));
  ids[0] = 2, ids[1] = m.boi_token_id, ids[n - 2] = m.eoi_token_id, ids[n - 1] = 5;
  for (int i = 2; i < n - 2; ++i) ids[i] = m.image_token_id;
  report("block_too_long", g4c_prefill_media(s, ids, n, soft, NULL, logits));
  ids[2] = 7;  /* now max_soft_tokens image tokens */
  report("null_soft_rows", g4c_prefill_media(s, ids, n, NULL, NULL, logits));
  for (int i = 3; i < n - 2; ++i) mask[i] = 1;
  mask[n - 2] = 1;
  report("mask_disagrees", g4c_prefill_media(s, ids, n, soft, mask, logits));
  mask[n - 2] = 0;
  report("mask_agrees", g4c_prefill_media(s, ids, n, soft, mask, logits));
  printf("position %d\n", g4c_position(s));
  g4c_reset(s);
  ids[3] = vocab + 3;
  report("token_outside", g4c_prefill_media(s, ids, n, soft, NULL, logits));
  report("null_ids", g4c_prefill_media(s, NULL, n, soft, NULL, logits));
  report("null_info", g4c_get_media_info(s, NULL));
  free(ids), free(mask), free(soft), free(xy), free(rows), free(logits);
  g4c_close(s);
  free_input(&in);
  return 0;
}

static int info(const char *dir) {
  g4c_session *s = NULL;
  if (g4c_open(dir, &s) != G4C_OK) return fprintf(stderr, "open: %s\n", g4c_last_error()), 1;
  g4c_media_info m;
  if (g4c_get_media_info(s, &m) != G4C_OK) return fprintf(stderr, "info: %s\n", g4c_last_error()), 1;
  printf("has_image %d\nhas_audio %d\nhidden_size %d\nbidirectional_vision %d\n", m.has_image, m.has_audio,
         m.hidden_size, m.bidirectional_vision);
  printf("image_token_id %d\nboi_token_id %d\neoi_token_id %d\n", m.image_token_id, m.boi_token_id, m.eoi_token_id);
  printf("audio_token_id %d\nboa_token_id %d\neoa_token_id %d\npad_token_id %d\n", m.audio_token_id, m.boa_token_id,
         m.eoa_token_id, m.pad_token_id);
  printf("patch_size %d\npooling_kernel_size %d\nmax_soft_tokens %d\n", m.patch_size, m.pooling_kernel_size,
         m.max_soft_tokens);
  printf("do_resize %d\nresample %d\ndo_rescale %d\ndo_normalize %d\ndo_convert_rgb %d\n", m.do_resize, m.resample,
         m.do_rescale, m.do_normalize, m.do_convert_rgb);
  printf("rescale_factor %.17g\nimage_mean %g,%g,%g\nimage_std %g,%g,%g\n", m.rescale_factor, m.image_mean[0],
         m.image_mean[1], m.image_mean[2], m.image_std[0], m.image_std[1], m.image_std[2]);
  printf("sampling_rate %d\nn_mels %d\naudio_seq_length %d\n", m.sampling_rate, m.n_mels, m.audio_seq_length);
  printf("hidden %d\nprocessor %s\n", g4c_hidden_size(s), g4c_processor_config(s));
  float *pixels = calloc(3 * m.patch_size * m.patch_size + 1, sizeof(float));
  float *features = calloc(4 * m.n_mels + 1, sizeof(float)), *rows = malloc(sizeof(float) * (m.hidden_size + 1));
  const int32_t xy[2] = {0, 0};
  int n_rows = -1;
  int code = g4c_encode_image(s, pixels, xy, 1, rows, 1, &n_rows);  /* one patch: not a k×k grid */
  free(pixels);
  printf("encode_image %d %s\n", code, code ? g4c_last_error() : "ok");
  code = g4c_encode_audio(s, features, 4, rows, 1, &n_rows);  /* 4 frames: one soft token */
  printf("encode_audio %d %s\n", code, code ? g4c_last_error() : "ok");
  free(features), free(rows);
  int32_t ids[2] = {2, 3};
  float *logits = malloc(sizeof(float) * g4c_vocab_size(s));
  code = g4c_prefill_media(s, ids, 2, NULL, NULL, logits);
  printf("prefill_media %d %s\n", code, code ? g4c_last_error() : "ok");
  free(logits);
  g4c_close(s);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 6 && strcmp(argv[1], "run") == 0) return run(argv[2], argv[3], argv[4], atoi(argv[5]));
  if (argc == 4 && strcmp(argv[1], "bad") == 0) return bad(argv[2], argv[3]);
  if (argc == 3 && strcmp(argv[1], "info") == 0) return info(argv[2]);
  fprintf(stderr, "usage: embed_media run ART INPUT OUTPUT CHUNK | bad ART INPUT | info ART\n");
  return 2;
}
