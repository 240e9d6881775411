"""Clinical vocabulary shared by the synthetic note generator and the entity extractor.

One source of truth: the generator writes notes from these lists and the extractor (``dischargesum.entities``)
recognises the same names, so synthetic ground truth and extraction agree on spelling. The lists are written
by hand from common inpatient medicine (discharge medication lists, basic metabolic panel / CBC, frequent
problems and procedures in MIMIC-IV discharge notes); they are not derived from MIMIC text. Extending a list
is safe; renaming or removing an entry changes synthetic data (and pinned test fingerprints).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Medication:
    name: str  # generic name as written in notes
    doses: tuple[str, ...]  # typical strengths, as strings ("0.5", "40")
    unit: str  # canonical unit (mg, mcg, units, g, mEq, mL, puff)
    routes: tuple[str, ...]  # PO, IV, SC, INH, PR, SL, TD
    frequencies: tuple[str, ...]  # daily, BID, TID, QID, q6h, qHS, PRN ...
    brands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lab:
    name: str  # canonical name
    aliases: tuple[str, ...]  # spellings seen in notes ("Cr", "Creat")
    unit: str  # canonical unit ("" for unitless ratios)
    low: float  # plausible range used by the generator
    high: float
    decimals: int


@dataclass(frozen=True)
class Vital:
    name: str  # canonical name: BP, HR, RR, SpO2, Temp, Weight
    aliases: tuple[str, ...]
    unit: str


MEDICATIONS: tuple[Medication, ...] = (
    Medication("aspirin", ("81", "325"), "mg", ("PO",), ("daily",)),
    Medication("atorvastatin", ("10", "20", "40", "80"), "mg", ("PO",), ("daily", "qHS"), ("Lipitor",)),
    Medication("simvastatin", ("20", "40"), "mg", ("PO",), ("qHS",), ("Zocor",)),
    Medication("metoprolol succinate", ("25", "50", "100"), "mg", ("PO",), ("daily",), ("Toprol XL",)),
    Medication("metoprolol tartrate", ("12.5", "25", "50"), "mg", ("PO",), ("BID",), ("Lopressor",)),
    Medication("lisinopril", ("2.5", "5", "10", "20", "40"), "mg", ("PO",), ("daily",), ("Zestril",)),
    Medication("losartan", ("25", "50", "100"), "mg", ("PO",), ("daily",), ("Cozaar",)),
    Medication("amlodipine", ("2.5", "5", "10"), "mg", ("PO",), ("daily",), ("Norvasc",)),
    Medication("furosemide", ("20", "40", "80"), "mg", ("PO", "IV"), ("daily", "BID"), ("Lasix",)),
    Medication("torsemide", ("10", "20", "40"), "mg", ("PO",), ("daily",)),
    Medication("spironolactone", ("12.5", "25", "50"), "mg", ("PO",), ("daily",), ("Aldactone",)),
    Medication("hydrochlorothiazide", ("12.5", "25"), "mg", ("PO",), ("daily",)),
    Medication("carvedilol", ("3.125", "6.25", "12.5", "25"), "mg", ("PO",), ("BID",), ("Coreg",)),
    Medication("diltiazem", ("30", "60", "120"), "mg", ("PO",), ("TID", "daily")),
    Medication("digoxin", ("0.125", "0.25"), "mg", ("PO",), ("daily",)),
    Medication("warfarin", ("1", "2", "2.5", "5"), "mg", ("PO",), ("daily",), ("Coumadin",)),
    Medication("apixaban", ("2.5", "5"), "mg", ("PO",), ("BID",), ("Eliquis",)),
    Medication("rivaroxaban", ("15", "20"), "mg", ("PO",), ("daily",), ("Xarelto",)),
    Medication("heparin", ("5000",), "units", ("SC",), ("q8h", "q12h")),
    Medication("enoxaparin", ("40", "60", "80"), "mg", ("SC",), ("daily", "q12h"), ("Lovenox",)),
    Medication("clopidogrel", ("75",), "mg", ("PO",), ("daily",), ("Plavix",)),
    Medication("insulin glargine", ("10", "15", "20", "30"), "units", ("SC",), ("qHS",), ("Lantus",)),
    Medication("insulin lispro", ("2", "4", "6", "8"), "units", ("SC",), ("TID with meals",), ("Humalog",)),
    Medication("metformin", ("500", "850", "1000"), "mg", ("PO",), ("BID",), ("Glucophage",)),
    Medication("levothyroxine", ("25", "50", "75", "88", "100"), "mcg", ("PO",), ("daily",), ("Synthroid",)),
    Medication("pantoprazole", ("40",), "mg", ("PO", "IV"), ("daily", "BID"), ("Protonix",)),
    Medication("omeprazole", ("20", "40"), "mg", ("PO",), ("daily",)),
    Medication("famotidine", ("20",), "mg", ("PO",), ("BID",)),
    Medication("ondansetron", ("4", "8"), "mg", ("PO", "IV"), ("q8h PRN",), ("Zofran",)),
    Medication("acetaminophen", ("325", "500", "650", "1000"), "mg", ("PO",), ("q6h PRN", "q8h")),
    Medication("oxycodone", ("2.5", "5", "10"), "mg", ("PO",), ("q4h PRN", "q6h PRN")),
    Medication("morphine", ("2", "4"), "mg", ("IV",), ("q4h PRN",)),
    Medication("hydromorphone", ("0.5", "1", "2"), "mg", ("IV", "PO"), ("q4h PRN",), ("Dilaudid",)),
    Medication("gabapentin", ("100", "300", "600"), "mg", ("PO",), ("TID", "qHS")),
    Medication("sertraline", ("25", "50", "100"), "mg", ("PO",), ("daily",)),
    Medication("citalopram", ("10", "20"), "mg", ("PO",), ("daily",)),
    Medication("trazodone", ("25", "50"), "mg", ("PO",), ("qHS PRN",)),
    Medication("quetiapine", ("25", "50"), "mg", ("PO",), ("qHS",)),
    Medication("lorazepam", ("0.5", "1"), "mg", ("PO", "IV"), ("q6h PRN",), ("Ativan",)),
    Medication("haloperidol", ("0.5", "1", "2"), "mg", ("IV", "PO"), ("q6h PRN",)),
    Medication("levetiracetam", ("500", "750", "1000"), "mg", ("PO", "IV"), ("BID",), ("Keppra",)),
    Medication("prednisone", ("5", "10", "20", "40", "60"), "mg", ("PO",), ("daily",)),
    Medication("methylprednisolone", ("40", "125"), "mg", ("IV",), ("q8h", "daily"), ("Solu-Medrol",)),
    Medication("albuterol", ("2",), "puff", ("INH",), ("q4h PRN",)),
    Medication("ipratropium", ("0.5",), "mg", ("INH",), ("q6h",)),
    Medication("tiotropium", ("18",), "mcg", ("INH",), ("daily",), ("Spiriva",)),
    Medication("ceftriaxone", ("1", "2"), "g", ("IV",), ("daily",)),
    Medication("cefepime", ("1", "2"), "g", ("IV",), ("q8h", "q12h")),
    Medication("vancomycin", ("750", "1000", "1250", "1500"), "mg", ("IV",), ("q12h",)),
    Medication("piperacillin-tazobactam", ("3.375", "4.5"), "g", ("IV",), ("q6h", "q8h"), ("Zosyn",)),
    Medication("azithromycin", ("250", "500"), "mg", ("PO", "IV"), ("daily",)),
    Medication("levofloxacin", ("500", "750"), "mg", ("PO", "IV"), ("daily",)),
    Medication("ciprofloxacin", ("250", "500"), "mg", ("PO",), ("BID",)),
    Medication("nitrofurantoin", ("100",), "mg", ("PO",), ("BID",)),
    Medication("metronidazole", ("500",), "mg", ("PO", "IV"), ("q8h",), ("Flagyl",)),
    Medication("cefpodoxime", ("200",), "mg", ("PO",), ("BID",)),
    Medication("potassium chloride", ("10", "20", "40"), "mEq", ("PO", "IV"), ("daily", "once")),
    Medication("magnesium sulfate", ("2",), "g", ("IV",), ("once",)),
    Medication("lactulose", ("15", "30"), "mL", ("PO",), ("TID",)),
    Medication("rifaximin", ("550",), "mg", ("PO",), ("BID",)),
    Medication("senna", ("8.6", "17.2"), "mg", ("PO",), ("BID",)),
    Medication("docusate sodium", ("100",), "mg", ("PO",), ("BID",), ("Colace",)),
    Medication("polyethylene glycol", ("17",), "g", ("PO",), ("daily",), ("Miralax",)),
    Medication("tamsulosin", ("0.4",), "mg", ("PO",), ("qHS",), ("Flomax",)),
    Medication("allopurinol", ("100", "300"), "mg", ("PO",), ("daily",)),
    Medication("folic acid", ("1",), "mg", ("PO",), ("daily",)),
    Medication("thiamine", ("100",), "mg", ("PO",), ("daily",)),
    Medication("nicotine patch", ("14", "21"), "mg", ("TD",), ("daily",)),
)

LABS: tuple[Lab, ...] = (
    Lab("sodium", ("Na", "sodium"), "mEq/L", 125, 148, 0),
    Lab("potassium", ("K", "potassium"), "mEq/L", 2.9, 6.1, 1),
    Lab("chloride", ("Cl", "chloride"), "mEq/L", 92, 112, 0),
    Lab("bicarbonate", ("HCO3", "bicarbonate", "bicarb"), "mEq/L", 14, 32, 0),
    Lab("BUN", ("BUN", "urea nitrogen"), "mg/dL", 6, 88, 0),
    Lab("creatinine", ("Cr", "creatinine", "Creat"), "mg/dL", 0.5, 4.8, 1),
    Lab("glucose", ("glucose", "Glu"), "mg/dL", 62, 412, 0),
    Lab("hemoglobin", ("Hgb", "hemoglobin", "Hb"), "g/dL", 6.8, 16.2, 1),
    Lab("hematocrit", ("Hct", "hematocrit"), "%", 21, 48, 1),
    Lab("white blood cell count", ("WBC", "white count"), "K/uL", 2.1, 24.5, 1),
    Lab("platelets", ("Plt", "platelets", "PLT"), "K/uL", 38, 520, 0),
    Lab("INR", ("INR",), "", 0.9, 4.8, 1),
    Lab("troponin T", ("TnT", "troponin", "trop"), "ng/mL", 0.01, 2.9, 2),
    Lab("lactate", ("lactate", "lactic acid"), "mmol/L", 0.6, 7.8, 1),
    Lab("ALT", ("ALT",), "IU/L", 9, 410, 0),
    Lab("AST", ("AST",), "IU/L", 11, 520, 0),
    Lab("total bilirubin", ("Tbili", "total bilirubin", "bilirubin"), "mg/dL", 0.2, 9.8, 1),
    Lab("albumin", ("albumin", "Alb"), "g/dL", 1.9, 4.8, 1),
    Lab("hemoglobin A1c", ("HbA1c", "A1c", "hemoglobin A1c"), "%", 4.9, 12.8, 1),
    Lab("BNP", ("BNP", "NT-proBNP"), "pg/mL", 40, 9800, 0),
    Lab("magnesium", ("Mg", "magnesium"), "mg/dL", 1.2, 2.8, 1),
    Lab("lipase", ("lipase",), "IU/L", 12, 1400, 0),
    Lab("TSH", ("TSH",), "uIU/mL", 0.1, 12.0, 2),
)

VITALS: tuple[Vital, ...] = (
    Vital("BP", ("BP", "blood pressure"), "mmHg"),
    Vital("HR", ("HR", "heart rate", "pulse", "P"), "bpm"),
    Vital("RR", ("RR", "respiratory rate"), "/min"),
    Vital("SpO2", ("SpO2", "O2 sat", "SaO2", "O2"), "%"),
    Vital("Temp", ("T", "Temp", "temperature", "Tmax"), "F"),
    Vital("Weight", ("weight", "Wt"), "kg"),
)

# Diagnoses and problems: (canonical name, abbreviations seen in notes).
DIAGNOSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("congestive heart failure", ("CHF", "heart failure")),
    ("acute kidney injury", ("AKI",)),
    ("chronic kidney disease", ("CKD",)),
    ("atrial fibrillation", ("AFib", "AF", "afib")),
    ("coronary artery disease", ("CAD",)),
    ("non-ST elevation myocardial infarction", ("NSTEMI",)),
    ("hypertension", ("HTN",)),
    ("hyperlipidemia", ("HLD",)),
    ("type 2 diabetes mellitus", ("T2DM", "DM2", "diabetes")),
    ("chronic obstructive pulmonary disease", ("COPD",)),
    ("community-acquired pneumonia", ("CAP", "pneumonia")),
    ("urinary tract infection", ("UTI",)),
    ("sepsis", ()),
    ("cellulitis", ()),
    ("deep vein thrombosis", ("DVT",)),
    ("pulmonary embolism", ("PE",)),
    ("gastrointestinal bleed", ("GI bleed", "GIB")),
    ("cirrhosis", ()),
    ("hepatic encephalopathy", ("HE",)),
    ("alcohol withdrawal", ()),
    ("acute pancreatitis", ("pancreatitis",)),
    ("diabetic ketoacidosis", ("DKA",)),
    ("hyponatremia", ()),
    ("hyperkalemia", ()),
    ("anemia", ()),
    ("delirium", ()),
    ("syncope", ()),
    ("ischemic stroke", ("CVA", "stroke")),
    ("transient ischemic attack", ("TIA",)),
    ("seizure", ()),
    ("small bowel obstruction", ("SBO",)),
    ("cholecystitis", ()),
    ("hypothyroidism", ()),
    ("depression", ()),
    ("obstructive sleep apnea", ("OSA",)),
    ("osteoarthritis", ("OA",)),
    ("benign prostatic hyperplasia", ("BPH",)),
    ("gout", ()),
)

# Procedures: (canonical name, abbreviations seen in notes).
PROCEDURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cardiac catheterization", ("cath", "LHC")),
    ("percutaneous coronary intervention", ("PCI",)),
    ("coronary artery bypass graft", ("CABG",)),
    ("transthoracic echocardiogram", ("TTE", "echo")),
    ("transesophageal echocardiogram", ("TEE",)),
    ("esophagogastroduodenoscopy", ("EGD",)),
    ("colonoscopy", ()),
    ("paracentesis", ()),
    ("thoracentesis", ()),
    ("lumbar puncture", ("LP",)),
    ("endotracheal intubation", ("intubation",)),
    ("central venous catheter placement", ("central line",)),
    ("hemodialysis", ("HD",)),
    ("blood transfusion", ("transfusion",)),
    ("CT abdomen and pelvis", ("CT A/P",)),
    ("CT head", ("head CT",)),
    ("chest x-ray", ("CXR",)),
    ("MRI brain", ("brain MRI",)),
    ("laparoscopic cholecystectomy", ("lap chole",)),
    ("ERCP", ()),
    ("cardioversion", ("DCCV",)),
    ("pacemaker placement", ("PPM placement",)),
    ("bronchoscopy", ()),
    ("incision and drainage", ("I&D",)),
)

NEGATION_CUES: tuple[str, ...] = (
    "no",
    "not",
    "denies",
    "denied",
    "without",
    "negative for",
    "no evidence of",
    "ruled out",
    "free of",
    "absence of",
)

SECTION_HEADERS: tuple[str, ...] = (
    "Chief Complaint",
    "History of Present Illness",
    "Past Medical History",
    "Social History",
    "Family History",
    "Physical Exam",
    "Pertinent Results",
    "Medications on Admission",
    "Discharge Medications",
    "Discharge Disposition",
    "Discharge Diagnosis",
    "Discharge Condition",
    "Discharge Instructions",
    "Major Surgical or Invasive Procedure",
    "Followup Instructions",
)
