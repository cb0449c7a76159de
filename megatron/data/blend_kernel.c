/* The greedy blend of megatron/data/blend.py (`blending_indices`; the rule is in that module's
   docstring), compiled on first use with the flags in `_KERNEL_FLAGS` and loaded through ctypes.
   Build it without FMA contraction: the lags must round exactly as NumPy's do. */
#include <stdint.h>
#include <stdlib.h>

static double lag(const double *w, const int64_t *c, int32_t d, int64_t k) {
    return w[d] * (double)(k + 1) - (double)c[d];
}

/* First step >= from at which dataset d's lag reaches level (its count fixed), INT64_MAX if never. */
static int64_t due_step(const double *w, const double *inverse_w, const int64_t *c, int32_t d, int64_t from,
                        double level) {
    if (!(w[d] > 0.0)) return INT64_MAX;
    /* an estimate (no division, no libm call); the loops below make it exact */
    double guess = (level + (double)c[d]) * inverse_w[d];
    if (guess > 4e18) return INT64_MAX;
    int64_t k = guess < (double)from ? from : (int64_t)guess;
    while (k > from && lag(w, c, d, k - 1) >= level) k--;
    while (lag(w, c, d, k) < level) k++;
    return k;
}

/* Datasets below the level wait in a timing wheel (doubly linked lists per slot, slot = due step mod
   wheel size); the ones at or above it sit in an unordered active array. */
typedef struct {
    const double *w;
    int64_t *counts, *due;
    double *active_w, *active_c, *scratch, *counts_d, *inverse_w;  /* counts_d: the counts as doubles */
    int32_t *all_ids;
    int32_t n, *active, *slot_head, *next, *prev, *where;  /* where: slot, or -1 active, -2 untracked */
    int64_t wheel, num_active;
} State;

static void wheel_insert(State *s, int32_t d, int64_t due) {
    s->due[d] = due;
    if (due == INT64_MAX) { s->where[d] = -2; return; }
    int32_t slot = (int32_t)(due & (s->wheel - 1));
    s->where[d] = slot;
    s->prev[d] = -1;
    s->next[d] = s->slot_head[slot];
    if (s->slot_head[slot] >= 0) s->prev[s->slot_head[slot]] = d;
    s->slot_head[slot] = d;
}

static void wheel_remove(State *s, int32_t d) {
    if (s->prev[d] >= 0) s->next[s->prev[d]] = s->next[d];
    else s->slot_head[s->where[d]] = s->next[d];
    if (s->next[d] >= 0) s->prev[s->next[d]] = s->prev[d];
}

/* Chooses step k's dataset. Every dataset with lag >= level is active, so a non-empty active set
   holds the maximum; otherwise all datasets are scanned. Returns the chosen lag. The active set is kept
   as parallel arrays (id, weight, count) because an active dataset's count cannot change until it is
   chosen, which makes the scan a plain pass over contiguous memory. */
static double blend_step(State *s, int64_t k, double level, int32_t *out_dataset, int64_t *out_sample) {
    int32_t slot = (int32_t)(k & (s->wheel - 1));
    for (int32_t d = s->slot_head[slot], following; d >= 0; d = following) {
        following = s->next[d];
        if (s->due[d] <= k) {
            wheel_remove(s, d);
            s->where[d] = -1;
            s->active[s->num_active] = d;
            s->active_w[s->num_active] = s->w[d];
            s->active_c[s->num_active++] = (double)s->counts[d];
        }
    }
    int64_t count = s->num_active > 0 ? s->num_active : s->n;
    const double *weights = s->num_active > 0 ? s->active_w : s->w;
    const double *counts = s->num_active > 0 ? s->active_c : s->counts_d;
    const int32_t *ids = s->num_active > 0 ? s->active : s->all_ids;
    double step = (double)(k + 1), *lags = s->scratch;
    for (int64_t i = 0; i < count; i++) lags[i] = weights[i] * step - counts[i];
    /* the maximum over four independent chains (no long dependency), then the lowest id holding it:
       exact ties are rare, so the last loop's branch is predictable */
    double m0 = lags[0], m1 = lags[0], m2 = lags[0], m3 = lags[0];
    int64_t i = 0;
    for (; i + 4 <= count; i += 4) {
        m0 = lags[i] > m0 ? lags[i] : m0;
        m1 = lags[i + 1] > m1 ? lags[i + 1] : m1;
        m2 = lags[i + 2] > m2 ? lags[i + 2] : m2;
        m3 = lags[i + 3] > m3 ? lags[i + 3] : m3;
    }
    for (; i < count; i++) m0 = lags[i] > m0 ? lags[i] : m0;
    m0 = m1 > m0 ? m1 : m0;
    m2 = m3 > m2 ? m3 : m2;
    double best_lag = m2 > m0 ? m2 : m0;
    int64_t position = 0;
    while (lags[position] != best_lag) position++;
    int32_t best = ids[position];
    for (int64_t j = position + 1; j < count; j++) {
        if (lags[j] == best_lag && ids[j] < best) {
            best = ids[j];
            position = j;
        }
    }
    out_dataset[k] = best;
    out_sample[k] = s->counts[best]++;
    s->counts_d[best] += 1.0;
    if (s->where[best] == -1) {
        int64_t last = --s->num_active;
        s->active[position] = s->active[last];
        s->active_w[position] = s->active_w[last];
        s->active_c[position] = s->active_c[last];
    } else if (s->where[best] >= 0) {
        wheel_remove(s, best);
    }
    wheel_insert(s, best, due_step(s->w, s->inverse_w, s->counts, best, k + 1, level));
    return best_lag;
}

/* Refills the wheel for a new level, starting at step k. */
static void reset(State *s, int64_t k, double level) {
    s->num_active = 0;
    for (int64_t i = 0; i < s->wheel; i++) s->slot_head[i] = -1;
    for (int32_t d = 0; d < s->n; d++) {
        wheel_insert(s, d, due_step(s->w, s->inverse_w, s->counts, d, k, level));
    }
}

/* Returns 0 on success, -1 when out of memory. The level only affects speed, never the result: it is
   re-tuned every window to the smallest lag chosen in the previous one (chosen lags cluster tightly). */
int blend_greedy(const double *w, int32_t n, int64_t size, int32_t *out_dataset, int64_t *out_sample) {
    State s = {w};
    s.n = n;
    s.wheel = 1024;
    while (s.wheel < 4 * (int64_t)n) s.wheel *= 2;
    s.counts = calloc(n, sizeof(int64_t));
    s.due = malloc(n * sizeof(int64_t));
    s.active = malloc(n * sizeof(int32_t));
    s.active_w = malloc(n * sizeof(double));
    s.active_c = malloc(n * sizeof(double));
    s.scratch = malloc(n * sizeof(double));
    s.counts_d = calloc(n, sizeof(double));
    s.inverse_w = malloc(n * sizeof(double));
    for (int32_t d = 0; s.inverse_w && d < n; d++) s.inverse_w[d] = w[d] > 0.0 ? 1.0 / w[d] : 0.0;
    s.all_ids = malloc(n * sizeof(int32_t));
    for (int32_t d = 0; s.all_ids && d < n; d++) s.all_ids[d] = d;
    s.next = malloc(n * sizeof(int32_t));
    s.prev = malloc(n * sizeof(int32_t));
    s.where = malloc(n * sizeof(int32_t));
    s.slot_head = malloc(s.wheel * sizeof(int32_t));
    int status = (s.counts && s.due && s.active && s.active_w && s.active_c && s.scratch && s.counts_d
                  && s.inverse_w && s.all_ids && s.next && s.prev && s.where && s.slot_head) ? 0 : -1;
    int64_t window = 16 * (int64_t)n + 1024;
    double level = 0.4;
    for (int64_t k = 0; k < size && status == 0;) {
        int64_t end = size - k < window ? size : k + window;
        reset(&s, k, level);
        double smallest = 2.0;
        for (; k < end; k++) {
            double chosen = blend_step(&s, k, level, out_dataset, out_sample);
            if (chosen < smallest) smallest = chosen;
        }
        level = smallest;
    }
    free(s.counts); free(s.due); free(s.active); free(s.active_w); free(s.active_c); free(s.scratch);
    free(s.counts_d); free(s.inverse_w); free(s.all_ids); free(s.next); free(s.prev); free(s.where); free(s.slot_head);
    return status;
}
