//! The FLOPs-budget loss and the annealing of the keep ratios.

use burn::prelude::*;

use crate::macs::MacModel;

/// Keep ratio at `progress` in [0, 1] of the warm-up: from 1 down to `target`, linearly.
pub fn annealed(target: f32, progress: f32) -> f32 {
    if progress >= 1.0 {
        target
    } else {
        1.0 - (1.0 - target) * progress.max(0.0)
    }
}

/// `(F(M) / F_dense - rho_target)^2`, averaged over the batch, where F(M) is the expected MACs
/// from the soft masks: `always + sum_l (macs_l + pairwise_l * space_l) * space_l * units_l`
/// (`always`: the layers no mask touches plus the method's own cost) and F_dense the same at
/// all-ones masks.
///
/// `soft_fractions[l]` holds the per-sample soft kept fractions `(space, units)` of layer l,
/// each `[batch]`; `rho_target` is the fraction implied by the current keep ratios
/// ([`crate::macs::MacModel::budget_fraction`]).
pub fn budget_loss<B: Backend>(
    mac_model: &MacModel,
    soft_fractions: &[(Tensor<B, 1>, Tensor<B, 1>)],
    rho_target: f32,
) -> Tensor<B, 1> {
    let always_macs = (mac_model.backbone_fixed + mac_model.method) as f64;
    let dense = always_macs + (0..mac_model.layers.len()).map(|l| mac_model.layer(l, 1.0, 1.0)).sum::<f64>();
    let mut expected: Option<Tensor<B, 1>> = None;
    for (l, (space, units)) in soft_fractions.iter().enumerate() {
        let (linear, pairwise) = (mac_model.layers[l] as f64 / dense, mac_model.pairwise[l] as f64 / dense);
        let term = (space.clone() * pairwise as f32 + linear as f32) * space.clone() * units.clone();
        expected = Some(match expected {
            Some(e) => e + term,
            None => term,
        });
    }
    match expected {
        Some(e) => (e + (always_macs / dense) as f32 - rho_target).powi_scalar(2).mean(),
        None => Tensor::zeros([1], &Default::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainBackend;

    #[test]
    fn anneals_from_one_to_target() {
        assert_eq!(annealed(0.4, 0.0), 1.0);
        assert!((annealed(0.4, 0.5) - 0.7).abs() < 1e-6);
        assert_eq!(annealed(0.4, 2.0), 0.4);
    }

    #[test]
    fn budget_is_zero_on_target_and_has_gradient() {
        let device = Default::default();
        let s = Tensor::<TrainBackend, 1>::from_floats([0.5, 0.5], &device).require_grad();
        let u = Tensor::<TrainBackend, 1>::from_floats([1.0, 1.0], &device);
        // fixed 20, layer 80: expected fraction 0.2 + 0.8 * 0.5 = 0.6
        let m = MacModel { backbone_fixed: 15, layers: vec![80], pairwise: vec![0], method: 5 };
        let on = budget_loss(&m, &[(s.clone(), u.clone())], 0.6);
        assert!(on.into_scalar().abs() < 1e-12);
        let off = budget_loss(&m, &[(s.clone(), u)], 0.4);
        let grads = off.backward();
        let g: Vec<f32> = s.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(g.iter().all(|&v| v > 0.0), "pushing the budget down must push S down: {g:?}");
    }
}
