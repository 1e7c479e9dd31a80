//! The semantic-ID prefix tree that constrains decoding.
//!
//! Every catalog item has a token path (`<movie><a_17><b_203><c_5>`, optionally a dedup
//! token last). While the model generates an item, only the children of the prefix
//! generated so far may be emitted; the trie answers "which tokens may come next" for every
//! beam at every step, so its queries are built to be cheap:
//!
//! * **Flat arena, CSR layout.** Nodes are numbered breadth-first, so the children of a node
//!   are a contiguous run of node ids and their entering tokens a contiguous, sorted run of
//!   one `Vec<TokenId>`. [`Trie::children`] is a slice borrow: no allocation, no hashing, no
//!   scan of the vocabulary. [`Trie::child`] is a binary search over that slice (a linear
//!   scan for small fan-out, where it is faster).
//! * **Leaf order = DFS order.** Items are numbered by their rank in the lexicographic order
//!   of their paths, which is the order a depth-first walk visits leaves. The items under any
//!   node therefore form one contiguous rank range ([`Trie::leaf_range`]), so "does this
//!   subtree contain an allowed item" is two lookups in a prefix-sum array ([`Mask`]).
//! * **Per-request restrictions never touch the structure.** Allowed entity types, items the
//!   user already saw and attribute filters are all a [`Mask`]: `O(items)` to build,
//!   `O(1)` per node to query, and shared read-only tries serve any number of requests.
//!
//! Paths may have different lengths (only colliding items get a dedup token) but no path
//! may be a prefix of another, so every leaf is exactly one item and no item sits on an
//! inner node. [`Trie::build`] checks this.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A vocabulary token id (the `sid` module maps SID token strings to these).
pub type TokenId = u32;
/// Index of an item in the catalog.
pub type ItemIdx = u32;

/// A node of a [`Trie`]. Only meaningful for the trie that handed it out.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    /// The node's position in the trie's arena (`0..trie.num_nodes()`; the root is 0).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Errors of this module. Every variant names the items involved so that a broken SID
/// table can be fixed without a debugger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    /// An item has no tokens at all.
    #[error("item {item} has an empty semantic-ID path")]
    EmptyPath { item: ItemIdx },
    /// The same item was given twice.
    #[error("item {item} appears twice (paths {first:?} and {second:?})")]
    DuplicateItem {
        item: ItemIdx,
        first: Vec<TokenId>,
        second: Vec<TokenId>,
    },
    /// Two items share one path: the decoder could not tell them apart.
    #[error("items {first} and {second} have the same path {path:?}")]
    DuplicatePath {
        first: ItemIdx,
        second: ItemIdx,
        path: Vec<TokenId>,
    },
    /// One item's path is a strict prefix of another's: the shorter item would sit on an
    /// inner node, and decoding could stop early or run on ambiguously.
    #[error(
        "path {prefix_path:?} of item {prefix_item} is a strict prefix of path {path:?} of item {item}"
    )]
    PrefixPath {
        prefix_item: ItemIdx,
        prefix_path: Vec<TokenId>,
        item: ItemIdx,
        path: Vec<TokenId>,
    },
    /// More nodes, items or path tokens than fit the `u32` indices of the arena.
    #[error("trie too large: more than {limit} {what}")]
    TooLarge { what: &'static str, limit: u64 },
}

/// Source of [`Trie`] identities, so a [`Mask`] can (in debug builds) detect being used
/// with a trie it was not built for.
static NEXT_TRIE_ID: AtomicU64 = AtomicU64::new(1);

/// Item → leaf rank. Catalog indices are normally dense (`0..n`), where a plain vector is
/// fastest; arbitrary sparse ids fall back to a sorted table with binary search instead
/// of allocating `max_id` slots.
#[derive(Clone)]
enum ItemRanks {
    /// `ranks[item]`, `u32::MAX` for "not in the trie".
    Dense(Vec<u32>),
    /// `(item, rank)` sorted by item.
    Sparse(Vec<(ItemIdx, u32)>),
}

impl ItemRanks {
    fn get(&self, item: ItemIdx) -> Option<u32> {
        match self {
            ItemRanks::Dense(v) => v.get(item as usize).copied().filter(|&r| r != u32::MAX),
            ItemRanks::Sparse(v) => v
                .binary_search_by_key(&item, |&(i, _)| i)
                .ok()
                .map(|k| v[k].1),
        }
    }
}

/// Fan-out up to which [`Trie::child`] scans linearly instead of binary searching.
const LINEAR_SCAN_MAX: usize = 8;

/// An immutable prefix tree over semantic-ID token paths. See the module docs for the
/// layout; build it once per catalog with [`Trie::build`] and share it (`&Trie`, `Arc`)
/// across requests.
#[derive(Clone)]
pub struct Trie {
    id: u64,
    /// CSR offsets: the children of node `n` are edges `child_off[n]..child_off[n + 1]`.
    /// Length `num_nodes + 1`.
    child_off: Vec<u32>,
    /// Token entering each edge's child, sorted within each node. Because nodes are
    /// numbered breadth-first, edge `e` enters node `e + 1`.
    child_tok: Vec<TokenId>,
    /// Node entered by each edge (`NodeId(e + 1)`), kept so [`Trie::child_nodes`] can
    /// hand out a slice.
    child_node: Vec<NodeId>,
    /// Leaf-rank range of each node's subtree.
    leaf_lo: Vec<u32>,
    leaf_hi: Vec<u32>,
    /// Item at each leaf rank.
    leaf_item: Vec<ItemIdx>,
    /// Paths concatenated in leaf order; leaf `r` owns `path_tok[path_off[r]..path_off[r + 1]]`.
    path_off: Vec<u32>,
    path_tok: Vec<TokenId>,
    item_rank: ItemRanks,
    depth: usize,
    max_fanout: usize,
}

impl fmt::Debug for Trie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trie")
            .field("items", &self.len())
            .field("nodes", &self.num_nodes())
            .field("depth", &self.depth)
            .field("max_fanout", &self.max_fanout)
            .finish()
    }
}

fn to_u32(n: usize, what: &'static str) -> Result<u32, TrieError> {
    u32::try_from(n).map_err(|_| TrieError::TooLarge {
        what,
        limit: u32::MAX as u64,
    })
}

impl Trie {
    /// Builds the trie from `(path, item)` pairs, in any order.
    ///
    /// Cost: one sort of the paths (`O(n log n)` comparisons) plus one breadth-first pass
    /// that touches every path token once. Errors, checked in this order: an empty path,
    /// the same item twice, two items with one path, a path that is a strict prefix of
    /// another. Each names the items involved.
    pub fn build(
        entries: impl IntoIterator<Item = (Vec<TokenId>, ItemIdx)>,
    ) -> Result<Trie, TrieError> {
        let mut entries: Vec<(Vec<TokenId>, ItemIdx)> = entries.into_iter().collect();
        if let Some((_, item)) = entries.iter().find(|(p, _)| p.is_empty()) {
            return Err(TrieError::EmptyPath { item: *item });
        }
        let n = entries.len();
        // One rank per leaf and one node per leaf at least: u32::MAX is the sentinel.
        if n >= u32::MAX as usize {
            return Err(TrieError::TooLarge {
                what: "items",
                limit: u32::MAX as u64 - 1,
            });
        }

        // Lexicographic path order is DFS leaf order; ties broken by item for determinism.
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));

        let item_rank = Self::rank_items(&entries)?;

        // With paths sorted, every path that starts with p directly follows p, so
        // comparing neighbours finds every duplicate and every prefix relation.
        for w in entries.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.0 == b.0 {
                return Err(TrieError::DuplicatePath {
                    first: a.1,
                    second: b.1,
                    path: a.0.clone(),
                });
            }
            if b.0.starts_with(&a.0) {
                return Err(TrieError::PrefixPath {
                    prefix_item: a.1,
                    prefix_path: a.0.clone(),
                    item: b.1,
                    path: b.0.clone(),
                });
            }
        }

        let total_tokens: usize = entries.iter().map(|(p, _)| p.len()).sum();
        to_u32(total_tokens, "path tokens")?;
        let mut path_off = Vec::with_capacity(n + 1);
        let mut path_tok = Vec::with_capacity(total_tokens);
        let mut leaf_item = Vec::with_capacity(n);
        let mut depth = 0;
        path_off.push(0u32);
        for (p, item) in &entries {
            path_tok.extend_from_slice(p);
            path_off.push(path_tok.len() as u32);
            leaf_item.push(*item);
            depth = depth.max(p.len());
        }
        drop(entries);

        // Breadth-first construction. Node `i` covers the sorted leaf ranks
        // `leaf_lo[i]..leaf_hi[i]`, which all agree on their first `node_depth[i]` tokens.
        // Splitting that range by the next token yields the children, appended to the
        // arena in token order; processing nodes in id order makes the numbering
        // breadth-first, so each node's children get consecutive ids.
        let path = |r: usize| &path_tok[path_off[r] as usize..path_off[r + 1] as usize];
        let mut leaf_lo = vec![0u32];
        let mut leaf_hi = vec![n as u32];
        let mut node_depth = vec![0u32];
        let mut child_off = vec![0u32];
        let mut child_tok = Vec::new();
        let mut max_fanout = 0;
        let mut i = 0;
        while i < leaf_lo.len() {
            let (lo, hi, d) = (
                leaf_lo[i] as usize,
                leaf_hi[i] as usize,
                node_depth[i] as usize,
            );
            let is_leaf = hi - lo == 1 && path(lo).len() == d;
            if !is_leaf {
                // Validation guarantees every path in a non-leaf range is longer than d.
                let before = child_tok.len();
                let mut start = lo;
                while start < hi {
                    let tok = path(start)[d];
                    let mut end = start + 1;
                    while end < hi && path(end)[d] == tok {
                        end += 1;
                    }
                    child_tok.push(tok);
                    leaf_lo.push(start as u32);
                    leaf_hi.push(end as u32);
                    node_depth.push(d as u32 + 1);
                    start = end;
                }
                max_fanout = max_fanout.max(child_tok.len() - before);
            }
            child_off.push(to_u32(child_tok.len(), "nodes")?);
            i += 1;
        }
        to_u32(leaf_lo.len(), "nodes")?;
        let child_node = (1..=child_tok.len() as u32).map(NodeId).collect();

        Ok(Trie {
            id: NEXT_TRIE_ID.fetch_add(1, Ordering::Relaxed),
            child_off,
            child_tok,
            child_node,
            leaf_lo,
            leaf_hi,
            leaf_item,
            path_off,
            path_tok,
            item_rank,
            depth,
            max_fanout,
        })
    }

    /// Item → leaf-rank index; reports an item given twice.
    fn rank_items(entries: &[(Vec<TokenId>, ItemIdx)]) -> Result<ItemRanks, TrieError> {
        let n = entries.len();
        let dup = |item: ItemIdx, a: usize, b: usize| TrieError::DuplicateItem {
            item,
            first: entries[a.min(b)].0.clone(),
            second: entries[a.max(b)].0.clone(),
        };
        let max_item = entries.iter().map(|e| e.1 as usize).max().unwrap_or(0);
        if max_item <= 2 * n + 1024 {
            let mut ranks = vec![u32::MAX; if n == 0 { 0 } else { max_item + 1 }];
            for (r, (_, item)) in entries.iter().enumerate() {
                let slot = &mut ranks[*item as usize];
                if *slot != u32::MAX {
                    return Err(dup(*item, *slot as usize, r));
                }
                *slot = r as u32;
            }
            Ok(ItemRanks::Dense(ranks))
        } else {
            let mut ranks: Vec<(ItemIdx, u32)> = entries
                .iter()
                .enumerate()
                .map(|(r, (_, item))| (*item, r as u32))
                .collect();
            ranks.sort_unstable();
            if let Some(w) = ranks.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(dup(w[0].0, w[0].1 as usize, w[1].1 as usize));
            }
            Ok(ItemRanks::Sparse(ranks))
        }
    }

    /// The root: the empty prefix. Its children are the type tokens.
    pub fn root(&self) -> NodeId {
        NodeId(0)
    }

    /// Tokens that may follow `node`'s prefix, sorted ascending. `O(1)`, a slice borrow.
    #[inline]
    pub fn children(&self, node: NodeId) -> &[TokenId] {
        &self.child_tok[self.edges(node)]
    }

    /// Nodes reached by each token of [`Trie::children`], in the same order. `O(1)`.
    #[inline]
    pub fn child_nodes(&self, node: NodeId) -> &[NodeId] {
        &self.child_node[self.edges(node)]
    }

    #[inline]
    fn edges(&self, node: NodeId) -> Range<usize> {
        let i = node.index();
        self.child_off[i] as usize..self.child_off[i + 1] as usize
    }

    /// The child of `node` entered by `token`, if any. `O(log fan-out)`: binary search of
    /// the sorted children, or a linear scan when there are only a few.
    #[inline]
    pub fn child(&self, node: NodeId, token: TokenId) -> Option<NodeId> {
        let edges = self.edges(node);
        let toks = &self.child_tok[edges.clone()];
        let k = if toks.len() <= LINEAR_SCAN_MAX {
            toks.iter().position(|&t| t == token)?
        } else {
            toks.binary_search(&token).ok()?
        };
        Some(NodeId((edges.start + k) as u32 + 1))
    }

    /// The node whose prefix is `prefix` (the root for an empty prefix), or `None` if no
    /// item's path starts with it. `O(len · log fan-out)`.
    pub fn walk(&self, prefix: &[TokenId]) -> Option<NodeId> {
        prefix
            .iter()
            .try_fold(self.root(), |node, &tok| self.child(node, tok))
    }

    /// The item at `node` if it is a leaf (a complete path), else `None`.
    #[inline]
    pub fn item(&self, node: NodeId) -> Option<ItemIdx> {
        let edges = self.edges(node);
        let lo = self.leaf_lo[node.index()] as usize;
        // Only leaves lack children; the empty trie's root has no children and no leaves.
        if edges.is_empty() && lo < self.leaf_item.len() {
            Some(self.leaf_item[lo])
        } else {
            None
        }
    }

    /// The item whose full path is `path`; `None` for prefixes and non-paths.
    pub fn lookup(&self, path: &[TokenId]) -> Option<ItemIdx> {
        self.item(self.walk(path)?)
    }

    /// The path of `item`, or `None` if the item is not in the trie. `O(1)` for dense
    /// catalog indices.
    pub fn path(&self, item: ItemIdx) -> Option<&[TokenId]> {
        self.item_rank.get(item).map(|r| self.leaf_path(r))
    }

    fn leaf_path(&self, rank: u32) -> &[TokenId] {
        let r = rank as usize;
        &self.path_tok[self.path_off[r] as usize..self.path_off[r + 1] as usize]
    }

    /// Number of items (leaves).
    pub fn len(&self) -> usize {
        self.leaf_item.len()
    }

    /// Whether the trie holds no items.
    pub fn is_empty(&self) -> bool {
        self.leaf_item.is_empty()
    }

    /// Number of nodes, root and leaves included; [`NodeId::index`] is below this.
    pub fn num_nodes(&self) -> usize {
        self.leaf_lo.len()
    }

    /// Length of the longest path (0 for an empty trie).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The largest number of children of any node.
    pub fn max_fanout(&self) -> usize {
        self.max_fanout
    }

    /// Leaf ranks of the items under `node`. Items under a node form a contiguous range
    /// in leaf (DFS) order: that is what makes masks cheap.
    #[inline]
    pub fn leaf_range(&self, node: NodeId) -> Range<u32> {
        let i = node.index();
        self.leaf_lo[i]..self.leaf_hi[i]
    }

    /// The items under `node`, in leaf order. A slice borrow, no traversal.
    pub fn items_under(&self, node: NodeId) -> &[ItemIdx] {
        let r = self.leaf_range(node);
        &self.leaf_item[r.start as usize..r.end as usize]
    }

    /// Every item in leaf (DFS, i.e. lexicographic path) order: `items()[rank]`.
    pub fn items(&self) -> &[ItemIdx] {
        &self.leaf_item
    }

    /// The leaf rank of `item` (its position in [`Trie::items`]).
    pub fn rank(&self, item: ItemIdx) -> Option<u32> {
        self.item_rank.get(item)
    }

    /// Children of `node` that lead to at least one item `mask` allows, with the node each
    /// enters, in token order. Writes into `out` (cleared first) so beam search can reuse
    /// one buffer: no allocation once it has grown. `O(fan-out)`, two array reads per child.
    pub fn allowed_children(&self, node: NodeId, mask: &Mask, out: &mut Vec<(TokenId, NodeId)>) {
        out.clear();
        debug_assert_eq!(mask.trie_id, self.id, "mask built for another trie");
        let edges = self.edges(node);
        // Children are nodes edges.start+1 ..= edges.end; their leaf ranges sit side by side.
        let nodes = edges.start + 1..edges.end + 1;
        let toks = &self.child_tok[edges];
        let los = &self.leaf_lo[nodes.clone()];
        let his = &self.leaf_hi[nodes.clone()];
        let cum = &mask.cum[..];
        for (k, ((&tok, &lo), &hi)) in toks.iter().zip(los).zip(his).enumerate() {
            if cum[hi as usize] > cum[lo as usize] {
                out.push((tok, NodeId((nodes.start + k) as u32)));
            }
        }
    }
}

/// A per-request restriction: which items may be generated.
///
/// Stored as prefix sums of "allowed" over leaf ranks (`cum[r]` = allowed items among
/// ranks `< r`). Since every subtree is a contiguous rank range, "is any allowed item
/// under this node" and "how many" are two array reads ([`Mask::allows_node`],
/// [`Mask::count_under`]), whatever the subtree size. Building costs `O(items)` time and
/// `4 · (items + 1)` bytes and never touches the trie's structure, so type filters,
/// seen-item exclusions and attribute filters cost nothing at trie build time.
///
/// Masks compose by chaining: start from [`Mask::all`], [`Mask::from_fn`],
/// [`Mask::from_items`] or [`Mask::from_types`], then narrow with [`Mask::exclude`] or
/// [`Mask::intersect`]. A mask belongs to the trie it was built from; using it with
/// another trie is a logic error (caught by a debug assertion).
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    trie_id: u64,
    /// Length `trie.len() + 1`; non-decreasing, steps of 0 or 1.
    cum: Vec<u32>,
}

impl fmt::Debug for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mask")
            .field("items", &(self.cum.len() - 1))
            .field("allowed", &self.allowed_items())
            .finish()
    }
}

impl Mask {
    /// The mask whose per-rank 0/1 `flags` (plus one trailing slot) are given; the buffer
    /// is turned into prefix sums in place.
    fn from_flags(trie: &Trie, mut flags: Vec<u32>) -> Mask {
        debug_assert_eq!(flags.len(), trie.len() + 1);
        // Exclusive prefix sum in place: cum[0] = 0, cum[r + 1] = cum[r] + flag[r].
        let mut acc = 0u32;
        for f in flags.iter_mut() {
            let flag = *f;
            *f = acc;
            acc += flag;
        }
        Mask {
            trie_id: trie.id,
            cum: flags,
        }
    }

    /// Per-rank 0/1 flags (plus a trailing 0), the inverse of the prefix sum.
    fn into_flags(self) -> (u64, Vec<u32>) {
        let mut cum = self.cum;
        let n = cum.len() - 1;
        for r in 0..n {
            cum[r] = cum[r + 1] - cum[r];
        }
        cum[n] = 0;
        (self.trie_id, cum)
    }

    /// Every item allowed.
    pub fn all(trie: &Trie) -> Mask {
        Mask {
            trie_id: trie.id,
            cum: (0..=trie.len() as u32).collect(),
        }
    }

    /// No item allowed.
    pub fn none(trie: &Trie) -> Mask {
        Mask {
            trie_id: trie.id,
            cum: vec![0; trie.len() + 1],
        }
    }

    /// Items for which `allowed` returns true (called once per item, in leaf order).
    pub fn from_fn(trie: &Trie, allowed: impl Fn(ItemIdx) -> bool) -> Mask {
        let mut flags: Vec<u32> = trie.leaf_item.iter().map(|&i| allowed(i) as u32).collect();
        flags.push(0);
        Mask::from_flags(trie, flags)
    }

    /// Exactly the listed items (an allow-list, e.g. an attribute filter evaluated
    /// elsewhere). Items not in the trie are ignored.
    pub fn from_items(trie: &Trie, items: &[ItemIdx]) -> Mask {
        let mut flags = vec![0u32; trie.len() + 1];
        for &item in items {
            if let Some(r) = trie.rank(item) {
                flags[r as usize] = 1;
            }
        }
        Mask::from_flags(trie, flags)
    }

    /// Items whose first token (the entity type) is one of `allowed_first_tokens`. Uses the
    /// root children's leaf ranges, so no per-item test is needed. Tokens that start no
    /// path are ignored.
    pub fn from_types(trie: &Trie, allowed_first_tokens: &[TokenId]) -> Mask {
        let mut flags = vec![0u32; trie.len() + 1];
        for &tok in allowed_first_tokens {
            if let Some(node) = trie.child(trie.root(), tok) {
                let r = trie.leaf_range(node);
                flags[r.start as usize..r.end as usize].fill(1);
            }
        }
        Mask::from_flags(trie, flags)
    }

    /// This mask minus `items` (e.g. what the user already saw). Consumes and reuses the
    /// mask's buffer: `O(items in trie + excluded)`, no allocation. Items not in the trie
    /// are ignored.
    pub fn exclude(self, trie: &Trie, items: &[ItemIdx]) -> Mask {
        debug_assert_eq!(self.trie_id, trie.id, "mask built for another trie");
        let (_, mut flags) = self.into_flags();
        for &item in items {
            if let Some(r) = trie.rank(item) {
                flags[r as usize] = 0;
            }
        }
        Mask::from_flags(trie, flags)
    }

    /// Items allowed by both masks (e.g. a type filter and an attribute filter).
    pub fn intersect(self, trie: &Trie, other: &Mask) -> Mask {
        debug_assert_eq!(self.trie_id, trie.id, "mask built for another trie");
        debug_assert_eq!(other.trie_id, trie.id, "mask built for another trie");
        let (_, mut flags) = self.into_flags();
        for (r, f) in flags.iter_mut().enumerate().take(trie.len()) {
            *f &= other.cum[r + 1] - other.cum[r];
        }
        Mask::from_flags(trie, flags)
    }

    /// Whether at least one allowed item lies under `node`. `O(1)`.
    #[inline]
    pub fn allows_node(&self, trie: &Trie, node: NodeId) -> bool {
        self.count_under(trie, node) > 0
    }

    /// Number of allowed items under `node`. `O(1)`.
    #[inline]
    pub fn count_under(&self, trie: &Trie, node: NodeId) -> usize {
        debug_assert_eq!(self.trie_id, trie.id, "mask built for another trie");
        let r = trie.leaf_range(node);
        (self.cum[r.end as usize] - self.cum[r.start as usize]) as usize
    }

    /// Whether `item` is in the trie and allowed.
    pub fn allows_item(&self, trie: &Trie, item: ItemIdx) -> bool {
        debug_assert_eq!(self.trie_id, trie.id, "mask built for another trie");
        trie.rank(item)
            .is_some_and(|r| self.cum[r as usize + 1] > self.cum[r as usize])
    }

    /// Total number of allowed items.
    pub fn allowed_items(&self) -> usize {
        *self.cum.last().expect("cum has a trailing slot") as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Trie {
        // <1><10><20>, <1><10><21><30>, <1><10><21><31>, <1><11>, <2><10>
        Trie::build(vec![
            (vec![1, 10, 21, 31], 2),
            (vec![2, 10], 4),
            (vec![1, 10, 20], 0),
            (vec![1, 11], 3),
            (vec![1, 10, 21, 30], 1),
        ])
        .unwrap()
    }

    #[test]
    fn empty_path_names_item() {
        let err = Trie::build(vec![(vec![1, 2], 0), (vec![], 7)]).unwrap_err();
        assert_eq!(err, TrieError::EmptyPath { item: 7 });
        assert!(err.to_string().contains("item 7"), "{err}");
    }

    #[test]
    fn duplicate_path_names_both_items() {
        let err = Trie::build(vec![(vec![1, 2], 5), (vec![1, 3], 0), (vec![1, 2], 9)]).unwrap_err();
        assert_eq!(
            err,
            TrieError::DuplicatePath {
                first: 5,
                second: 9,
                path: vec![1, 2]
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("items 5 and 9"), "{msg}");
    }

    #[test]
    fn prefix_path_names_both_items() {
        let err = Trie::build(vec![(vec![1, 2, 3], 4), (vec![1, 2], 8), (vec![2], 1)]).unwrap_err();
        assert!(matches!(
            err,
            TrieError::PrefixPath {
                prefix_item: 8,
                item: 4,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("item 8") && msg.contains("item 4"), "{msg}");
    }

    #[test]
    fn prefix_is_found_when_not_adjacent_in_input() {
        // Input order hides the relation; sorted it is [1], [1,5,5], [2].
        let err = Trie::build(vec![(vec![1, 5, 5], 0), (vec![2], 1), (vec![1], 2)]).unwrap_err();
        assert!(matches!(
            err,
            TrieError::PrefixPath {
                prefix_item: 2,
                item: 0,
                ..
            }
        ));
    }

    #[test]
    fn duplicate_item_names_item_and_paths() {
        for items in [[3, 3], [3_000_000, 3_000_000]] {
            // Dense and sparse item indices take different paths.
            let err =
                Trie::build(vec![(vec![1, 2], items[0]), (vec![1, 3], items[1])]).unwrap_err();
            assert_eq!(
                err,
                TrieError::DuplicateItem {
                    item: items[0],
                    first: vec![1, 2],
                    second: vec![1, 3]
                }
            );
            assert!(err.to_string().contains(&format!("item {}", items[0])));
        }
    }

    #[test]
    fn same_entry_twice_is_a_duplicate_item() {
        let err = Trie::build(vec![(vec![1, 2], 0), (vec![1, 2], 0)]).unwrap_err();
        assert!(matches!(err, TrieError::DuplicateItem { item: 0, .. }));
    }

    #[test]
    fn empty_trie() {
        let t = Trie::build(Vec::new()).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        assert_eq!(t.depth(), 0);
        assert_eq!(t.max_fanout(), 0);
        assert_eq!(t.children(t.root()), &[] as &[TokenId]);
        assert_eq!(t.item(t.root()), None);
        assert_eq!(t.walk(&[]), Some(t.root()));
        assert_eq!(t.lookup(&[]), None);
        assert_eq!(t.path(0), None);
        let m = Mask::all(&t);
        assert_eq!(m.allowed_items(), 0);
        assert!(!m.allows_node(&t, t.root()));
        let mut out = vec![(0, t.root())];
        t.allowed_children(t.root(), &m, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn layout_is_breadth_first_csr() {
        let t = small();
        assert_eq!(t.len(), 5);
        assert_eq!(t.depth(), 4);
        assert_eq!(t.max_fanout(), 2);
        assert_eq!(t.children(t.root()), &[1, 2]);
        assert_eq!(t.child_nodes(t.root()), &[NodeId(1), NodeId(2)]);
        let n1 = t.child(t.root(), 1).unwrap();
        assert_eq!(t.children(n1), &[10, 11]);
        assert_eq!(t.leaf_range(n1), 0..4);
        assert_eq!(t.items_under(n1), &[0, 1, 2, 3]);
        assert_eq!(t.items(), &[0, 1, 2, 3, 4]);
        let n1_10 = t.walk(&[1, 10]).unwrap();
        assert_eq!(t.leaf_range(n1_10), 0..3);
        assert_eq!(t.item(n1_10), None);
        assert_eq!(t.lookup(&[1, 10, 21, 30]), Some(1));
        assert_eq!(t.lookup(&[1, 10, 21]), None);
        assert_eq!(t.lookup(&[1, 10, 21, 30, 0]), None);
        assert_eq!(t.path(3), Some(&[1, 11][..]));
        assert_eq!(t.path(5), None);
        assert_eq!(t.child(t.root(), 3), None);
        assert_eq!(t.num_nodes(), 10);
    }

    #[test]
    fn masks_prune_subtrees() {
        let t = small();
        let m = Mask::all(&t).exclude(&t, &[0, 1, 2, 99]);
        assert_eq!(m.allowed_items(), 2);
        let n1_10 = t.walk(&[1, 10]).unwrap();
        assert!(!m.allows_node(&t, n1_10));
        let mut out = Vec::new();
        t.allowed_children(t.walk(&[1]).unwrap(), &m, &mut out);
        assert_eq!(out, vec![(11, t.walk(&[1, 11]).unwrap())]);
        assert!(m.allows_item(&t, 3) && !m.allows_item(&t, 0) && !m.allows_item(&t, 99));

        let types = Mask::from_types(&t, &[2, 7]);
        assert_eq!(types.allowed_items(), 1);
        assert_eq!(types, Mask::from_fn(&t, |i| t.path(i).unwrap()[0] == 2));
        assert_eq!(types, Mask::from_items(&t, &[4]));
        let both = Mask::from_fn(&t, |i| i % 2 == 0).intersect(&t, &Mask::from_types(&t, &[1]));
        assert_eq!(both, Mask::from_items(&t, &[0, 2]));
        assert_eq!(Mask::none(&t).allowed_items(), 0);
        assert_eq!(m.count_under(&t, t.root()), 2);
    }
}
