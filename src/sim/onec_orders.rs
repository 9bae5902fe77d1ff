//! A stock 1C's site orders, as its «Обмен с сайтом» uploads them with `type=sale`: the only
//! documents a stock УТ 11, Розница 2.2 or УНФ 3.0 sends on that channel
//! (`../shared/specs/onec-stock-channels.md` §1).
//!
//! Written from УТ 11.5.8's own code, `CommonModules/ОбменССайтом/Ext/Module.bsl` of
//! `evlahov-igor/UT11@302d05cb4370`:
//! - `СформироватьЗаказыXDTO` (`:5447-5505`): only orders that came from a site (a site
//!   number and date), `Ид` = the order's 1C GUID, `Номер`/`Дата` = the **site's** number and
//!   date, `ХозОперация` «Заказ товара», `Роль` «Продавец», `Валюта` = the first three
//!   characters of the currency's code (`643`), `Курс`, `Сумма`, `Время`, one `Контрагент`
//!   (its 1C GUID and name, no contacts: `ДанныеКонтрагента`, `:5507-5521`);
//! - `ДобавитьТоварыЗаказаXDTO` (`:5531-5670`): `Ид`, `Артикул`, `Наименование`,
//!   `БазоваяЕдиница`, `ЦенаЗаЕдиницу`, `Количество`, `Сумма` per line;
//! - `ДобавитьЗначенияРеквизитовЗаказаXDTO` (`:5680-5730`): `Номер по 1С`, `Дата по 1С`,
//!   `ПометкаУдаления`, `Проведен`; `Номер/Дата оплаты по 1С` once paid, `Номер/Дата
//!   отгрузки по 1С` once shipped, `Отменен` = true when closed while in work. There is no
//!   «Заказ оплачен» requisite;
//! - the file is `orders-<UUID>_<N>.xml` (`:3789`), UTF-8 with the XML declaration, schema
//!   version 2.07 (`ВерсияСхемы`, `:391`) in the `urn:1C.ru:commerceml_2` namespace, elements
//!   in schema order (XDTO writes them so, and `Проверить()` checks the object first).
//!
//! An order is re-uploaded whenever it changes (`OSP:1954-2054`), so the same `Ид` arrives
//! again with a new status.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use crate::core::money::Money;
use crate::sim::sales::Shop;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderState {
    New,
    Paid,
    Shipped,
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct SiteOrder {
    /// The order's GUID in 1C.
    pub id: String,
    pub site_number: String,
    pub site_date: DateTime<Utc>,
    pub number_1c: String,
    pub customer: usize,
    /// (product index, quantity)
    pub lines: Vec<(usize, i64)>,
    pub state: OrderState,
    pub paid_at: Option<DateTime<Utc>>,
    pub shipped_at: Option<DateTime<Utc>>,
}

/// A site's orders inside a 1C base, changing over time.
pub struct SiteOrders {
    shop: Shop,
    tz: Tz,
    rng: fastrand::Rng,
    pub orders: Vec<SiteOrder>,
    changed: BTreeSet<usize>,
    files: usize,
    /// The 1C GUID of each shop customer (`Контрагент/Ид`).
    customer_ids: Vec<String>,
}

fn guid(kind: &str, n: usize) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{kind}:{n}").as_bytes()).to_string()
}

/// The 1C GUID of a shop customer as the orders name it (`Контрагент/Ид`).
pub fn customer_guid(i: usize) -> String {
    guid("partner", i)
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl SiteOrders {
    pub fn new(shop: Shop, seed: u64, tz: Tz) -> SiteOrders {
        SiteOrders {
            shop,
            tz,
            rng: fastrand::Rng::with_seed(seed),
            orders: Vec::new(),
            changed: BTreeSet::new(),
            files: 0,
            customer_ids: Vec::new(),
        }
    }

    /// The customers' 1C GUIDs, when the orders belong to a base whose partners are known
    /// elsewhere (the OData simulator's): the same person, whichever channel names them.
    pub fn customer_ids(mut self, ids: Vec<String>) -> SiteOrders {
        self.customer_ids = ids;
        self
    }

    fn line_sum(&self, (p, qty): (usize, i64)) -> Money {
        Money(self.shop.products[p].price.0 * qty)
    }

    pub fn total(&self, o: &SiteOrder) -> Money {
        Money(o.lines.iter().map(|l| self.line_sum(*l).0).sum())
    }

    /// New orders placed on the site at `at` and loaded into 1C.
    pub fn place(&mut self, n: usize, at: DateTime<Utc>) -> Vec<usize> {
        let buyable = self.shop.products.iter().filter(|p| !p.service).count().max(1);
        (0..n)
            .map(|_| {
                let i = self.orders.len();
                let lines = (0..self.rng.usize(1..4))
                    .map(|_| (self.rng.usize(0..buyable), self.rng.i64(1..4)))
                    .collect();
                self.orders.push(SiteOrder {
                    id: guid("order", i),
                    site_number: format!("{}", 1000 + i),
                    site_date: at,
                    number_1c: format!("ЗК-{:06}", i + 1),
                    customer: self.rng.usize(0..self.shop.customers.len().max(1)),
                    lines,
                    state: OrderState::New,
                    paid_at: None,
                    shipped_at: None,
                });
                self.changed.insert(i);
                i
            })
            .collect()
    }

    pub fn pay(&mut self, i: usize, at: DateTime<Utc>) {
        if let Some(o) = self.orders.get_mut(i).filter(|o| o.state == OrderState::New) {
            o.state = OrderState::Paid;
            o.paid_at = Some(at);
            self.changed.insert(i);
        }
    }

    pub fn ship(&mut self, i: usize, at: DateTime<Utc>) {
        if let Some(o) = self
            .orders
            .get_mut(i)
            .filter(|o| matches!(o.state, OrderState::New | OrderState::Paid))
        {
            o.state = OrderState::Shipped;
            o.shipped_at = Some(at);
            self.changed.insert(i);
        }
    }

    pub fn cancel(&mut self, i: usize) {
        if let Some(o) = self.orders.get_mut(i).filter(|o| o.state != OrderState::Shipped) {
            o.state = OrderState::Cancelled;
            self.changed.insert(i);
        }
    }

    /// Orders that count as sales when paid (`[onec] orders = "when_paid"`): paid or shipped
    /// after payment, and not cancelled. (count, total)
    pub fn paid_truth(&self) -> (usize, Money) {
        let paid: Vec<&SiteOrder> = self
            .orders
            .iter()
            .filter(|o| o.paid_at.is_some() && o.state != OrderState::Cancelled)
            .collect();
        (paid.len(), Money(paid.iter().map(|o| self.total(o).0).sum()))
    }

    /// 1C's exchange went through: the orders it sent are no longer registered for upload.
    /// (A run that failed or was cut leaves them registered, and the next run sends them
    /// again, in their state then.)
    pub fn confirm(&mut self) {
        self.changed.clear();
    }

    /// The file 1C uploads now: every order changed since the last confirmed upload, or
    /// `None` when nothing changed (1C then uploads nothing). Named as 1C names it.
    pub fn upload(&mut self, at: DateTime<Utc>) -> Option<(String, Vec<u8>)> {
        if self.changed.is_empty() {
            return None;
        }
        let changed: Vec<usize> = self.changed.iter().copied().collect();
        let local = |t: DateTime<Utc>| t.with_timezone(&self.tz).naive_local();
        let mut x = String::with_capacity(2048 * changed.len());
        let _ = write!(
            x,
            "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация \
             xmlns=\"urn:1C.ru:commerceml_2\" xmlns:xs=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ВерсияСхемы=\"2.07\" \
             ДатаФормирования=\"{}\">",
            local(at).format("%Y-%m-%dT%H:%M:%S")
        );
        for i in changed {
            let o = &self.orders[i];
            let c = &self.shop.customers[o.customer];
            let site = local(o.site_date);
            let _ = write!(
                x,
                "<Документ><Ид>{}</Ид><Номер>{}</Номер><Дата>{}</Дата><ХозОперация>Заказ товара</ХозОперация>\
                 <Роль>Продавец</Роль><Валюта>643</Валюта><Курс>1</Курс><Сумма>{}</Сумма>\
                 <Контрагенты><Контрагент><Ид>{}</Ид><Наименование>{}</Наименование>\
                 <ПолноеНаименование>{}</ПолноеНаименование><Роль>Покупатель</Роль></Контрагент></Контрагенты>\
                 <Время>{}</Время><Товары>",
                o.id,
                o.site_number,
                site.format("%Y-%m-%d"),
                self.total(o),
                self.customer_ids
                    .get(o.customer)
                    .cloned()
                    .unwrap_or_else(|| customer_guid(o.customer)),
                esc(c.name.as_deref().unwrap_or("Покупатель")),
                esc(c.name.as_deref().unwrap_or("Покупатель")),
                site.format("%H:%M:%S"),
            );
            for &(p, qty) in &o.lines {
                let prod = &self.shop.products[p];
                let _ = write!(
                    x,
                    "<Товар><Ид>{}</Ид><Артикул>{}</Артикул><Наименование>{}</Наименование>\
                     <БазоваяЕдиница Код=\"796\" НаименованиеПолное=\"Штука\" МеждународноеСокращение=\"PCE\">шт</БазоваяЕдиница>\
                     <ЦенаЗаЕдиницу>{}</ЦенаЗаЕдиницу><Количество>{qty}</Количество><Сумма>{}</Сумма></Товар>",
                    prod.id,
                    prod.id,
                    esc(&prod.name),
                    prod.price,
                    self.line_sum((p, qty)),
                );
            }
            x.push_str("</Товары><ЗначенияРеквизитов>");
            let mut req = |name: &str, value: &str| {
                let _ = write!(
                    x,
                    "<ЗначениеРеквизита><Наименование>{name}</Наименование><Значение>{}</Значение></ЗначениеРеквизита>",
                    esc(value)
                );
            };
            let stamp = |t: DateTime<Utc>| local(t).format("%Y-%m-%dT%H:%M:%S").to_string();
            req("Номер по 1С", &o.number_1c);
            req("Дата по 1С", &stamp(o.site_date + Duration::minutes(1)));
            req("ПометкаУдаления", "false");
            req("Проведен", "true");
            if let Some(t) = o.paid_at {
                req("Номер оплаты по 1С", &format!("ПКО-{:06}", i + 1));
                req("Дата оплаты по 1С", &stamp(t));
            }
            if let Some(t) = o.shipped_at {
                req("Номер отгрузки по 1С", &format!("РТ-{:06}", i + 1));
                req("Дата отгрузки по 1С", &stamp(t));
            }
            if o.state == OrderState::Cancelled {
                req("Отменен", "true");
            }
            x.push_str("</ЗначенияРеквизитов></Документ>");
        }
        x.push_str("</КоммерческаяИнформация>\n");
        self.files += 1;
        let name = format!("orders-{}_{}.xml", guid("exchange", 0), self.files);
        Some((name, x.into_bytes()))
    }
}
