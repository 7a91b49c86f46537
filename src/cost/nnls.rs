//! Non-negative least squares for the cost model's coefficients: the Lawson–Hanson active-set method,
//! written as an argmin [`Solver`] and run by argmin's [`Executor`] (which owns the iteration limit,
//! the termination bookkeeping and the best-so-far state).
//!
//! Coefficients are counts of tensors or seconds per unit of work, so they are non-negative; a fit that
//! may go negative explains noise with cancelling terms and extrapolates badly. A small ridge toward a
//! prior keeps the problem well posed when probes cannot tell two features apart: identified directions
//! follow the data, unidentified ones stay at the prior.

use argmin::core::{
    CostFunction, Error, Executor, Gradient, IterState, KV, Problem, Solver, State,
    TerminationReason, TerminationStatus,
};

/// `min ½‖A·x − b‖²` over `x ≥ 0`; `rows` are the rows of `A`.
pub struct LeastSquares {
    pub rows: Vec<Vec<f64>>,
    pub targets: Vec<f64>,
}

impl LeastSquares {
    fn columns(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    fn residuals(&self, x: &[f64]) -> Vec<f64> {
        self.rows
            .iter()
            .zip(&self.targets)
            .map(|(row, b)| row.iter().zip(x).map(|(a, x)| a * x).sum::<f64>() - b)
            .collect()
    }

    /// Unconstrained least squares over the columns in `passive` (others held at zero), by Householder
    /// QR. Columns whose pivot vanishes get zero.
    fn solve_on(&self, passive: &[bool]) -> Vec<f64> {
        let cols: Vec<usize> = (0..passive.len()).filter(|&j| passive[j]).collect();
        let m = self.rows.len();
        let p = cols.len();
        let mut a: Vec<Vec<f64>> = cols
            .iter()
            .map(|&j| self.rows.iter().map(|r| r[j]).collect())
            .collect();
        let mut rhs = self.targets.clone();
        let mut diag = vec![0.0; p];
        for k in 0..p.min(m) {
            let norm = a[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm == 0.0 {
                continue;
            }
            let alpha = if a[k][k] > 0.0 { -norm } else { norm };
            let mut v: Vec<f64> = a[k][k..].to_vec();
            v[0] -= alpha;
            let vnorm2: f64 = v.iter().map(|x| x * x).sum();
            diag[k] = alpha;
            if vnorm2 == 0.0 {
                continue;
            }
            let reflect = |col: &mut [f64]| {
                let dot: f64 = v.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
                let scale = 2.0 * dot / vnorm2;
                for (c, vi) in col.iter_mut().zip(&v) {
                    *c -= scale * vi;
                }
            };
            for column in a.iter_mut().skip(k + 1) {
                reflect(&mut column[k..]);
            }
            reflect(&mut rhs[k..]);
        }
        let largest = diag.iter().fold(0.0f64, |m, d| m.max(d.abs()));
        let mut x = vec![0.0; p];
        for k in (0..p.min(m)).rev() {
            if diag[k].abs() <= largest * 1e-13 {
                continue;
            }
            let mut s = rhs[k];
            for j in k + 1..p {
                s -= a[j][k] * x[j];
            }
            x[k] = s / diag[k];
        }
        let mut full = vec![0.0; passive.len()];
        for (&j, value) in cols.iter().zip(x) {
            full[j] = value;
        }
        full
    }
}

impl CostFunction for LeastSquares {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, x: &Vec<f64>) -> Result<f64, Error> {
        Ok(0.5 * self.residuals(x).iter().map(|r| r * r).sum::<f64>())
    }
}

impl Gradient for LeastSquares {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, x: &Vec<f64>) -> Result<Vec<f64>, Error> {
        let r = self.residuals(x);
        let mut g = vec![0.0; self.columns()];
        for (row, ri) in self.rows.iter().zip(&r) {
            for (gj, a) in g.iter_mut().zip(row) {
                *gj += a * ri;
            }
        }
        Ok(g)
    }
}

type NnlsState = IterState<Vec<f64>, Vec<f64>, (), (), (), f64>;

/// Lawson & Hanson (1974), one outer iteration (one variable freed) per argmin iteration.
#[derive(Default)]
pub struct LawsonHanson {
    passive: Vec<bool>,
    converged: bool,
}

impl Solver<LeastSquares, NnlsState> for LawsonHanson {
    const NAME: &'static str = "Lawson-Hanson NNLS";

    fn init(
        &mut self,
        problem: &mut Problem<LeastSquares>,
        state: NnlsState,
    ) -> Result<(NnlsState, Option<KV>), Error> {
        let n = problem.problem("columns", |p| Ok(p.columns()))?;
        self.passive = vec![false; n];
        self.converged = false;
        let x = vec![0.0; n];
        let cost = problem.cost(&x)?;
        Ok((state.param(x).cost(cost), None))
    }

    fn next_iter(
        &mut self,
        problem: &mut Problem<LeastSquares>,
        mut state: NnlsState,
    ) -> Result<(NnlsState, Option<KV>), Error> {
        let mut x = state.take_param().unwrap_or_default();
        let gradient = problem.gradient(&x)?;
        // The most promising variable to free: steepest descent direction among those held at zero.
        let scale = gradient
            .iter()
            .fold(0.0f64, |m, g| m.max(g.abs()))
            .max(1e-300);
        let candidate = (0..x.len())
            .filter(|&j| !self.passive[j] && -gradient[j] > 1e-12 * scale)
            .max_by(|&a, &b| (-gradient[a]).total_cmp(&-gradient[b]));
        let Some(j) = candidate else {
            self.converged = true;
            let cost = problem.cost(&x)?;
            return Ok((state.param(x).cost(cost), None));
        };
        self.passive[j] = true;
        let before = x.clone();
        for _ in 0..=x.len() {
            let s = problem.problem("subproblem", |p| Ok(p.solve_on(&self.passive)))?;
            let infeasible: Vec<usize> = (0..x.len())
                .filter(|&i| self.passive[i] && s[i] <= 0.0)
                .collect();
            if infeasible.is_empty() {
                x = s;
                break;
            }
            // Step from x toward s as far as feasibility allows, then drop the variables that hit zero.
            let alpha = infeasible
                .iter()
                .map(|&i| x[i] / (x[i] - s[i]))
                .filter(|a| a.is_finite())
                .fold(1.0f64, f64::min)
                .max(0.0);
            for i in 0..x.len() {
                x[i] += alpha * (s[i] - x[i]);
                if self.passive[i] && x[i] <= 1e-15 * (1.0 + s[i].abs()) {
                    self.passive[i] = false;
                    x[i] = 0.0;
                }
            }
            if !self.passive.iter().any(|&p| p) {
                break;
            }
        }
        if !self.passive[j] && x == before {
            // The freed variable went straight back to zero: rounding, not progress. Stop here rather
            // than free it again forever.
            self.converged = true;
        }
        let cost = problem.cost(&x)?;
        Ok((state.param(x).cost(cost), None))
    }

    fn terminate(&mut self, _state: &NnlsState) -> TerminationStatus {
        if self.converged {
            TerminationStatus::Terminated(TerminationReason::SolverConverged)
        } else {
            TerminationStatus::NotTerminated
        }
    }
}

/// Why a fit failed.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("non-negative least squares failed: {0}")]
    Solver(String),
    #[error("fit has {features} features but rows of width {width}")]
    Shape { features: usize, width: usize },
}

/// Fits `x ≥ 0` minimising `‖rows·x − targets‖² + ridge·‖D(x − prior)‖²`, where `D` scales every
/// column to unit norm (so `ridge` is relative and units do not matter). Columns that are zero in
/// every row are not identified by the data and get their prior.
pub fn fit_nonnegative(
    rows: &[Vec<f64>],
    targets: &[f64],
    prior: &[f64],
    ridge: f64,
) -> Result<Vec<f64>, FitError> {
    let k = prior.len();
    if let Some(bad) = rows.iter().find(|r| r.len() != k) {
        return Err(FitError::Shape {
            features: k,
            width: bad.len(),
        });
    }
    let norms: Vec<f64> = (0..k)
        .map(|j| rows.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt())
        .collect();
    let active: Vec<usize> = (0..k)
        .filter(|&j| norms[j] > 0.0 && norms[j].is_finite())
        .collect();
    let mut solution = prior.to_vec();
    if active.is_empty() {
        return Ok(solution);
    }
    let mut a: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| active.iter().map(|&j| r[j] / norms[j]).collect())
        .collect();
    let mut b = targets.to_vec();
    let root = ridge.max(0.0).sqrt();
    for (c, &j) in active.iter().enumerate() {
        let mut row = vec![0.0; active.len()];
        row[c] = root;
        a.push(row);
        b.push(root * prior[j] * norms[j]);
    }
    let problem = LeastSquares {
        rows: a,
        targets: b,
    };
    let result = Executor::new(problem, LawsonHanson::default())
        .configure(|state| state.max_iters(10 * active.len() as u64 + 10))
        .timer(false)
        .run()
        .map_err(|e| FitError::Solver(e.to_string()))?;
    let state = result.state();
    let scaled = state
        .get_best_param()
        .or(state.get_param())
        .ok_or_else(|| FitError::Solver("no solution".to_string()))?;
    for (c, &j) in active.iter().enumerate() {
        solution[j] = scaled[c] / norms[j];
    }
    Ok(solution)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_nonnegative_solution() {
        // b = A·[2, 0, 3]: the middle coefficient is zero, not negative.
        let rows = vec![
            vec![1.0, 2.0, 0.0],
            vec![0.0, 1.0, 1.0],
            vec![1.0, 0.0, 1.0],
            vec![2.0, 1.0, 3.0],
        ];
        let truth = [2.0, 0.0, 3.0];
        let targets: Vec<f64> = rows
            .iter()
            .map(|r| r.iter().zip(&truth).map(|(a, x)| a * x).sum())
            .collect();
        let x = fit_nonnegative(&rows, &targets, &[0.0; 3], 0.0).unwrap();
        for (got, want) in x.iter().zip(truth) {
            assert!((got - want).abs() < 1e-9, "{x:?}");
        }
    }

    #[test]
    fn clamps_where_unconstrained_least_squares_goes_negative() {
        // Unconstrained: b = 1·c0 − 1·c1 fits exactly; constrained: the best with c1 = 0 is
        // c0 = (1·1 + 1·0)/(1+1) = 0.5 on rows [1,1] and [1,0] with targets 0 and 1.
        let rows = vec![vec![1.0, 1.0], vec![1.0, 0.0]];
        let x = fit_nonnegative(&rows, &[0.0, 1.0], &[0.0, 0.0], 0.0).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1] == 0.0, "{x:?}");
    }

    #[test]
    fn unexcited_and_collinear_columns_fall_back_to_the_prior() {
        // Column 2 never varies from zero: its prior (7) stands. Columns 0 and 1 are identical: the
        // data fix their sum (4); the ridge splits it evenly from a zero prior.
        let rows = vec![vec![1.0, 1.0, 0.0], vec![2.0, 2.0, 0.0]];
        let x = fit_nonnegative(&rows, &[4.0, 8.0], &[0.0, 0.0, 7.0], 1e-9).unwrap();
        assert_eq!(x[2], 7.0);
        assert!(
            (x[0] + x[1] - 4.0).abs() < 1e-6 && (x[0] - x[1]).abs() < 1e-6,
            "{x:?}"
        );
    }
}
