"""Unit-economics model: arithmetic against hand-computed values, break-even, claim check, bad input."""

import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

import pytest

from t2sql_nb.business import (CostAssumptions, RevenueAssumptions, arpu_readings, break_even_users,
                               check_profit_claim, monthly_pnl, plot_profit_heatmap, plot_profit_lines,
                               profit_grid)
from t2sql_nb.core import T2SQLError

# Two tiers at 10 and 20 RMB split evenly, 10% conversion, half of the users active, 10% churn.
SMALL_REVENUE = RevenueAssumptions(basic_price=10, premium_price=20, family_price=40, basic_share=0.5,
                                   premium_share=0.5, family_share=0, conversion_rate=0.1, dau_ratio=0.5,
                                   monthly_churn=0.1, tutoring_hours_per_payer=0)
SMALL_COSTS = CostAssumptions(inference_cost_per_active_user=1, storage_cost_per_registered_user=0,
                              payment_fee_rate=0.01, app_store_share=0, acquisition_cost_per_payer=20,
                              fixed_costs_per_month=1_000)


# Each case: (revenue changes, cost changes, registered users, {line: hand-computed value}).
HAND_COMPUTED = [
    # 100 payers x 15 = 1,500; inference 500; churn 10 x 20 = 200; fees 15; fixed 1,000.
    ({}, {}, 1_000, {"paying_users": 100, "active_users": 500, "arppu": 15, "arpu": 1.5,
                     "subscription_revenue": 1_500, "payment_fees": 15, "inference_cost": 500,
                     "acquisition_cost": 200, "variable_costs": 715, "contribution_margin": 785,
                     "profit": -215}),
    # Half the list price collected: ARPPU 7.5, subscriptions 750, fees 7.5.
    ({"realized_price_ratio": 0.5}, {}, 1_000, {"arppu": 7.5, "subscription_revenue": 750, "payment_fees": 7.5,
                                                "profit": 750 - 7.5 - 500 - 200 - 1_000}),
    # 0.5 tutoring hours per payer: 50 h x 120 = 6,000 revenue, 50 h x 80 = 4,000 tutor pay, 60 fees.
    ({"tutoring_hours_per_payer": 0.5}, {}, 1_000, {"tutoring_revenue": 6_000, "tutor_cost": 4_000,
                                                    "payment_fees": 15 + 60, "revenue": 7_500}),
    # 40% of subscriptions through the App Store at 30%: 1,500 x (0.6 x 0.01 + 0.4 x 0.3) = 189.
    ({}, {"app_store_share": 0.4, "app_store_fee_rate": 0.3}, 1_000, {"payment_fees": 189}),
    # API and school lines do not grow with users: 20,000 calls x 30 / 1,000 = 600; 2 schools x 30,000 / 12.
    ({"api_calls_per_month": 20_000, "schools": 2}, {}, 0, {"api_revenue": 600, "api_cost": 60,
                                                            "school_revenue": 5_000, "revenue": 5_600,
                                                            "profit": 5_600 - 60 - 1_000}),
    # Storage is charged per registered user, active or not.
    ({}, {"storage_cost_per_registered_user": 0.3}, 1_000, {"storage_cost": 300, "profit": -515}),
]


@pytest.mark.parametrize("revenue_changes, cost_changes, users, expected", HAND_COMPUTED)
def test_pnl_matches_hand_computation(revenue_changes, cost_changes, users, expected):
    pnl = monthly_pnl(users, replace(SMALL_REVENUE, **revenue_changes), replace(SMALL_COSTS, **cost_changes))
    for line, value in expected.items():
        assert pnl[line] == pytest.approx(value), line


def test_pnl_lines_add_up():
    pnl = monthly_pnl(12_345)
    cost_lines = ("payment_fees", "inference_cost", "storage_cost", "tutor_cost", "api_cost", "acquisition_cost")
    revenue_lines = ("subscription_revenue", "tutoring_revenue", "api_revenue", "school_revenue")
    assert pnl["revenue"] == pytest.approx(sum(pnl[k] for k in revenue_lines))
    assert pnl["variable_costs"] == pytest.approx(sum(pnl[k] for k in cost_lines))
    assert pnl["profit"] == pytest.approx(pnl["revenue"] - pnl["variable_costs"] - pnl["fixed_costs"])
    assert pnl["arpu"] == pytest.approx(pnl["arppu"] * RevenueAssumptions().conversion_rate)


def test_pnl_at_zero_users_has_no_arpu():
    pnl = monthly_pnl(0, SMALL_REVENUE, SMALL_COSTS)
    assert math.isnan(pnl["arpu"])
    assert pnl["profit"] == -1_000


def test_default_assumptions_at_claim_size():
    # 8,000 payers x 84 = 672,000 subscriptions, 800 h x 120 = 96,000 tutoring; fees 33,062.4 + 576,
    # inference 30,000 x 4 = 120,000, storage 20,000, tutors 64,000, churn 640 x 150 = 96,000.
    pnl = monthly_pnl(100_000)
    assert pnl["revenue"] == pytest.approx(768_000)
    assert pnl["variable_costs"] == pytest.approx(333_638.4)
    assert pnl["profit"] == pytest.approx(-65_638.4)


def test_break_even_small_case():
    # Slope 0.785 RMB per registered user, intercept -1,000: ceil(1,000 / 0.785) = 1,274.
    assert break_even_users(SMALL_REVENUE, SMALL_COSTS) == 1_274


def test_break_even_is_first_profitable_size():
    scenarios = [(RevenueAssumptions(), CostAssumptions()),
                 (replace(RevenueAssumptions(), realized_price_ratio=0.5), CostAssumptions()),
                 (SMALL_REVENUE, SMALL_COSTS)]
    for revenue, costs in scenarios:
        users = break_even_users(revenue, costs)
        assert monthly_pnl(users, revenue, costs)["profit"] >= 0
        assert monthly_pnl(users - 1, revenue, costs)["profit"] < 0


def test_break_even_monotonic_in_fixed_cost():
    fixed_levels = [0, 1, 500, 1_000, 50_000, 500_000, 5_000_000]
    for revenue, costs in ((SMALL_REVENUE, SMALL_COSTS), (RevenueAssumptions(), CostAssumptions())):
        break_evens = [break_even_users(revenue, replace(costs, fixed_costs_per_month=f)) for f in fixed_levels]
        assert break_evens == sorted(break_evens)
        assert break_evens[0] == 0
        assert break_evens[-1] > break_evens[1]


def test_break_even_zero_with_fixed_revenue():
    revenue = replace(SMALL_REVENUE, schools=1, school_price_per_year=12_000)
    assert break_even_users(revenue, SMALL_COSTS) == 0


def test_break_even_infinite_for_losing_users():
    costs = replace(SMALL_COSTS, inference_cost_per_active_user=10)
    assert break_even_users(SMALL_REVENUE, costs) == math.inf
    claim = check_profit_claim(1_000, SMALL_REVENUE, costs)
    assert claim["holds"] is False
    assert "no number of users breaks even" in claim["summary"]


def test_claim_check_reports_margin():
    claim = check_profit_claim(1_000, SMALL_REVENUE, SMALL_COSTS)
    assert claim["holds"] is False
    assert claim["profit"] == pytest.approx(-215)
    assert claim["break_even_users"] == 1_274
    assert "monthly loss is 215 RMB" in claim["summary"]
    assert "(274 more)" in claim["summary"]
    profitable = check_profit_claim(2_000, SMALL_REVENUE, SMALL_COSTS)
    assert profitable["holds"] is True
    assert profitable["profit"] == pytest.approx(2_000 * 0.785 - 1_000)
    assert profitable["summary"].startswith("holds")


def test_arpu_readings_of_pilot_figure():
    readings = arpu_readings(42.0)
    per_payer = readings["implied revenue per paying user"]
    assert per_payer["per registered user (ARPU)"] == pytest.approx(525)
    assert per_payer["per paying user (ARPPU)"] == pytest.approx(42)
    assert per_payer["per daily active user"] == pytest.approx(157.5)
    assert readings.loc["per paying user (ARPPU)", "implied share of list price"] == pytest.approx(0.5)
    assert not readings.loc["per registered user (ARPU)", "between cheapest and dearest tier"]
    assert not readings.loc["per paying user (ARPPU)", "between cheapest and dearest tier"]


def test_profit_grid_matches_pnl():
    grid = profit_grid([0.04, 0.08], [2.0, 4.0], registered_users=50_000)
    expected = monthly_pnl(50_000, replace(RevenueAssumptions(), conversion_rate=0.04),
                           replace(CostAssumptions(), inference_cost_per_active_user=2.0))["profit"]
    assert grid.loc[2.0, 0.04] == pytest.approx(expected)
    assert grid.loc[2.0, 0.08] > grid.loc[2.0, 0.04]
    assert grid.loc[4.0, 0.08] < grid.loc[2.0, 0.08]


def test_plots_draw_grid():
    grid = profit_grid([0.02, 0.08, 0.2], [1.0, 4.0, 12.0])
    heatmap = plot_profit_heatmap(grid)
    assert len(heatmap.axes) == 2
    assert heatmap.axes[0].collections, "the heatmap has no mesh"
    lines = plot_profit_lines(grid)
    assert len(lines.axes[0].lines) == 3 + 1


BAD_REVENUE = [
    ({"basic_price": -59}, "RevenueAssumptions.basic_price: must be a finite number >= 0, got -59"),
    ({"family_price": float("inf")}, "RevenueAssumptions.family_price: must be a finite number >= 0"),
    ({"premium_share": 0.5}, "the tier shares must sum to 1, got 1.05"),
    ({"basic_share": 0.2}, "the tier shares must sum to 1, got 0.7"),
    ({"conversion_rate": 8}, "RevenueAssumptions.conversion_rate: must be a fraction between 0 and 1, got 8"),
    ({"dau_ratio": -0.3}, "RevenueAssumptions.dau_ratio: must be a finite number >= 0"),
    ({"monthly_churn": "8%"}, "RevenueAssumptions.monthly_churn: expected a number, got '8%'"),
    ({"schools": True}, "RevenueAssumptions.schools: expected a number, got True"),
]


@pytest.mark.parametrize("changes, message", BAD_REVENUE)
def test_bad_revenue_assumptions_rejected(changes, message):
    with pytest.raises(T2SQLError) as error:
        RevenueAssumptions(**changes)
    assert message in str(error.value)


BAD_COSTS = [
    ({"fixed_costs_per_month": -1}, "CostAssumptions.fixed_costs_per_month: must be a finite number >= 0, got -1"),
    ({"inference_cost_per_active_user": float("nan")}, "CostAssumptions.inference_cost_per_active_user"),
    ({"app_store_fee_rate": 30}, "CostAssumptions.app_store_fee_rate: must be a fraction between 0 and 1, got 30"),
    ({"payment_fee_rate": None}, "CostAssumptions.payment_fee_rate: expected a number, got None"),
]


@pytest.mark.parametrize("changes, message", BAD_COSTS)
def test_bad_cost_assumptions_rejected(changes, message):
    with pytest.raises(T2SQLError) as error:
        CostAssumptions(**changes)
    assert message in str(error.value)


def test_replace_validates_fields():
    with pytest.raises(T2SQLError, match="RevenueAssumptions.premium_price"):
        replace(RevenueAssumptions(), premium_price=-1)


@pytest.mark.parametrize("users", [-1, float("nan"), "100000", True])
def test_bad_registered_users_rejected(users):
    with pytest.raises(T2SQLError, match="registered_users: must be a finite number >= 0"):
        monthly_pnl(users)


def test_arpu_readings_need_conversion():
    with pytest.raises(T2SQLError, match="conversion_rate: must be > 0"):
        arpu_readings(42.0, replace(RevenueAssumptions(), conversion_rate=0))
