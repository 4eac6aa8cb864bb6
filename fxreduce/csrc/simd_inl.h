// Unaligned vector load and store through memcpy, each one instruction of the including unit's ISA. Included
// inside each kernel unit's own per-ISA namespace, hence no include guard: one shared inline copy could be
// merged by the linker into the build for the widest ISA and run on a CPU without it.
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// An L x L transpose of L vectors in place: log2(L) butterfly stages of two-vector shuffles (rows i and i + H
// swap their off-diagonal H-blocks), L log2(L) shuffles for L^2 elements instead of a load and store each.
template <int... I>
struct Lanes {};
template <int N, int... I>
struct MakeLanes : MakeLanes<N - 1, N - 1, I...> {};
template <int... I>
struct MakeLanes<0, I...> {
  typedef Lanes<I...> type;
};

template <int H, int L, typename V, int... I>
inline V low_half(V a, V b, Lanes<I...>) {
  return __builtin_shufflevector(a, b, ((I & H) == 0 ? I : L + I - H)...);
}
template <int H, int L, typename V, int... I>
inline V high_half(V a, V b, Lanes<I...>) {
  return __builtin_shufflevector(a, b, ((I & H) == 0 ? I + H : L + I)...);
}

template <int H, int L, typename V>
__attribute__((always_inline)) inline void transpose(V* m) {
  if constexpr (H > 0) {
    for (int i = 0; i < L; ++i)
      if ((i & H) == 0) {
        const V a = m[i], b = m[i + H];
        m[i] = low_half<H, L>(a, b, typename MakeLanes<L>::type());
        m[i + H] = high_half<H, L>(a, b, typename MakeLanes<L>::type());
      }
    transpose<H / 2, L>(m);
  }
}
