//! How the masks are set, and the counting rules the trainer and the executor share.

use serde::{Deserialize, Serialize};

/// Which masks are active (the ablations of the method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// No masks: the dense backbone.
    Dense,
    /// DataMask only (spatial patches).
    Data,
    /// ModelMask only (units).
    Model,
    /// Both, driven by the one importance map S.
    Both,
}

impl MaskMode {
    pub fn data(self) -> bool {
        matches!(self, MaskMode::Data | MaskMode::Both)
    }
    pub fn model(self) -> bool {
        matches!(self, MaskMode::Model | MaskMode::Both)
    }
}

/// The masks of a forward: mode and keep ratios (annealed while training); stored in a
/// checkpoint and an exported model as its inference masking.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Masking {
    pub mode: MaskMode,
    /// Fraction of patches kept by the DataMask: the top `ceil(data_keep * N)` of every sample,
    /// or, with `data_threshold`, the mean fraction that threshold was calibrated to keep.
    pub data_keep: f32,
    /// Fraction of units kept by the ModelMask in every prunable layer.
    pub unit_keep: f32,
    /// When set, the DataMask keeps the patches with `S >= data_threshold`: a count that varies
    /// per sample (rainy samples keep more patches than dry ones). Absent in checkpoints from
    /// before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_threshold: Option<f32>,
}

impl Masking {
    pub const DENSE: Masking = Masking::top_k(MaskMode::Dense, 1.0, 1.0);

    /// Masks keeping a fixed fraction of each sample's patches and of each layer's units.
    pub const fn top_k(mode: MaskMode, data_keep: f32, unit_keep: f32) -> Masking {
        Masking { mode, data_keep, unit_keep, data_threshold: None }
    }

    /// How the DataMask picks patches, when it is active.
    pub fn patch_rule(&self) -> Option<PatchRule> {
        let rule = match self.data_threshold {
            Some(tau) => PatchRule::Threshold(tau),
            None => PatchRule::TopK(self.data_keep),
        };
        self.mode.data().then_some(rule)
    }

    /// The ModelMask's keep ratio when it is active.
    pub fn unit_keep(&self) -> Option<f32> {
        self.mode.model().then_some(self.unit_keep)
    }

    /// What a budget-conditioned mask generator and its unit gates read: the patch and the unit
    /// keep ratios of this forward, 1 for a mask that is off.
    pub fn budget_inputs(&self) -> [f32; 2] {
        [if self.mode.data() { self.data_keep } else { 1.0 }, if self.mode.model() { self.unit_keep } else { 1.0 }]
    }

    /// These masks at other keep ratios (`--keep`, `--keep-units`) of a budget-conditioned
    /// model: top-k at `data_keep` and `unit_keep`, each active mask's checked against its
    /// trained range (an inactive mask keeps everything).
    pub fn with_keep(self, ranges: KeepRanges, data_keep: f32, unit_keep: f32) -> Result<Masking, String> {
        let data_keep = if self.mode.data() { ranges.data.check("patch keep ratio", data_keep)? } else { 1.0 };
        let unit_keep = if self.mode.model() { ranges.units.check("unit keep ratio", unit_keep)? } else { 1.0 };
        Ok(Masking::top_k(self.mode, data_keep, unit_keep))
    }
}

/// The keep ratios a budget-conditioned model was trained for: every training batch drew its
/// patch and unit keep ratios uniformly from `[lo, hi]`. Written `[lo, hi]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "[f32; 2]", into = "[f32; 2]")]
pub struct KeepRange {
    pub lo: f32,
    pub hi: f32,
}

impl From<[f32; 2]> for KeepRange {
    fn from([lo, hi]: [f32; 2]) -> Self {
        KeepRange { lo, hi }
    }
}

impl From<KeepRange> for [f32; 2] {
    fn from(r: KeepRange) -> Self {
        [r.lo, r.hi]
    }
}

impl KeepRange {
    /// A range of keep ratios: `0 < lo <= hi <= 1`.
    pub fn is_valid(&self) -> bool {
        self.lo > 0.0 && self.lo <= self.hi && self.hi <= 1.0
    }

    pub fn contains(&self, ratio: f32) -> bool {
        (self.lo..=self.hi).contains(&ratio)
    }

    /// `ratio` when it lies in the range; otherwise an error naming `what` and the range.
    pub fn check(&self, what: &str, ratio: f32) -> Result<f32, String> {
        if self.contains(ratio) {
            Ok(ratio)
        } else {
            Err(format!("{what} {ratio} is outside the range the model was trained for, {self}"))
        }
    }
}

/// As written in a config: `[lo, hi]`.
impl std::fmt::Display for KeepRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}]", self.lo, self.hi)
    }
}

/// The trained ranges of a budget-conditioned model's patch and unit keep ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeepRanges {
    pub data: KeepRange,
    pub units: KeepRange,
}

impl KeepRanges {
    /// From `method.keep_range` (both masks) and `method.unit_keep_range` (the units' own range,
    /// when given); `None` for a model trained for one budget.
    pub fn new(keep_range: Option<KeepRange>, unit_keep_range: Option<KeepRange>) -> Option<KeepRanges> {
        keep_range.map(|data| KeepRanges { data, units: unit_keep_range.unwrap_or(data) })
    }

    /// The patch and unit keep ratios at `position` along both ranges: their lower ends at 0,
    /// their upper ends at 1 (the one budget axis of `--latency-ms` and of validation).
    pub fn at(&self, position: f32) -> (f32, f32) {
        let along = |r: KeepRange| r.lo * (1.0 - position) + r.hi * position;
        (along(self.data), along(self.units))
    }

    /// The unit keep ratio at the position along its range that `data_keep` has along the
    /// patches' range (the budget axis of [`KeepRanges::at`]); `None` when the patches' range is
    /// a single ratio. A ratio outside the patches' range maps outside the units'.
    pub fn units_matching(&self, data_keep: f32) -> Option<f32> {
        let span = self.data.hi - self.data.lo;
        (span > 0.0).then(|| self.at((data_keep - self.data.lo) / span).1)
    }

    /// The keep ratios at both ends of the ranges, the tightest budget first (what validation
    /// and the sandwich rule run at).
    pub fn ends(&self) -> [(f32, f32); 2] {
        [self.at(0.0), self.at(1.0)]
    }
}

/// How the DataMask picks a sample's patches from its importance map S.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PatchRule {
    /// The top `ceil(keep * N)` (the per-sample rule).
    TopK(f32),
    /// Those with `S >= tau` (the calibrated batch rule): a count per sample, possibly none.
    Threshold(f32),
}

impl PatchRule {
    /// The kept patch indices, ascending.
    pub fn select(self, scores: &[f32]) -> Vec<usize> {
        match self {
            PatchRule::TopK(keep) => top_k(scores, kept_count(keep, scores.len())),
            PatchRule::Threshold(tau) => (0..scores.len()).filter(|&i| scores[i] >= tau).collect(),
        }
    }
}

/// Number kept out of `total` at ratio `ratio`: `ceil(ratio * total)`, at least 1.
pub fn kept_count(ratio: f32, total: usize) -> usize {
    ((ratio as f64 * total as f64 - 1e-6).ceil() as usize).clamp(1, total)
}

/// Indices of the `k` largest scores (ties: lower index first), sorted ascending.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// Per-patch statistics per channel the mask generator reads: mean, max, mean |diff| of the
/// last two frames, and with `motion` the signed mean diff.
pub fn stats_per_channel(motion: bool) -> usize {
    3 + usize::from(motion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_count_is_ceil_and_at_least_one() {
        assert_eq!(kept_count(0.3, 10), 3);
        assert_eq!(kept_count(0.31, 10), 4);
        assert_eq!(kept_count(0.0, 10), 1);
        assert_eq!(kept_count(1.0, 7), 7);
    }

    #[test]
    fn top_k_keeps_the_largest_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.2, 0.2, 0.2], 2), vec![0, 1]);
    }

    #[test]
    fn issue_26_a_keep_outside_the_trained_range_is_refused() {
        let range = KeepRange { lo: 0.2, hi: 0.6 };
        let ranges = KeepRanges::new(Some(range), None).unwrap();
        let m = Masking::top_k(MaskMode::Both, 0.4, 0.4);
        assert_eq!(m.with_keep(ranges, 0.2, 0.6).unwrap(), Masking::top_k(MaskMode::Both, 0.2, 0.6));
        let err = m.with_keep(ranges, 0.7, 0.4).unwrap_err();
        assert!(err.contains("patch keep ratio 0.7") && err.contains("[0.2, 0.6]"), "{err}");
        assert!(m.with_keep(ranges, 0.4, 0.1).unwrap_err().contains("unit keep ratio 0.1"));
        let data_only = Masking::top_k(MaskMode::Data, 0.4, 1.0);
        assert_eq!(data_only.with_keep(ranges, 0.3, 0.1).unwrap(), Masking::top_k(MaskMode::Data, 0.3, 1.0));
        assert_eq!(serde_json::to_string(&range).unwrap(), "[0.2,0.6]");
        assert_eq!(range.to_string(), "[0.2, 0.6]");
    }

    #[test]
    fn the_units_can_have_their_own_range() {
        let ranges = KeepRanges::new(Some(KeepRange { lo: 0.6, hi: 1.0 }), Some(KeepRange { lo: 0.25, hi: 0.5 }));
        let ranges = ranges.unwrap();
        let m = Masking::top_k(MaskMode::Both, 1.0, 0.25);
        assert_eq!(m.with_keep(ranges, 0.6, 0.5).unwrap(), Masking::top_k(MaskMode::Both, 0.6, 0.5));
        let err = m.with_keep(ranges, 0.6, 0.6).unwrap_err();
        assert!(err.contains("unit keep ratio 0.6") && err.contains("[0.25, 0.5]"), "{err}");
        assert!(m.with_keep(ranges, 0.5, 0.3).unwrap_err().contains("[0.6, 1]"));
        assert_eq!(ranges.at(0.0), (0.6, 0.25));
        assert_eq!(ranges.at(1.0), (1.0, 0.5));
        assert_eq!(ranges.ends(), [(0.6, 0.25), (1.0, 0.5)]);
        assert_eq!(KeepRanges::new(None, Some(KeepRange { lo: 0.2, hi: 0.4 })), None);
        assert_eq!(ranges.units_matching(0.6), Some(0.25));
        assert_eq!(ranges.units_matching(1.0), Some(0.5));
        assert!((ranges.units_matching(0.8).unwrap() - 0.375).abs() < 1e-6);
        assert!(ranges.units_matching(0.5).unwrap() < 0.25, "outside the patches' range maps outside");
        let one_ratio = KeepRanges::new(Some(KeepRange { lo: 0.5, hi: 0.5 }), Some(KeepRange { lo: 0.2, hi: 0.4 }));
        assert_eq!(one_ratio.unwrap().units_matching(0.5), None);
    }

    #[test]
    fn patch_rules_follow_the_mode() {
        let m = Masking::top_k(MaskMode::Model, 0.5, 0.25);
        assert_eq!(m.patch_rule(), None);
        assert_eq!(m.unit_keep(), Some(0.25));
        let t = Masking { data_threshold: Some(0.5), ..Masking::top_k(MaskMode::Both, 0.5, 1.0) };
        assert_eq!(t.patch_rule().unwrap().select(&[0.4, 0.5, 0.9]), vec![1, 2]);
        assert_eq!(Masking::DENSE.patch_rule(), None);
    }
}
