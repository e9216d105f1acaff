from django import forms

from cases.models import BiopsyCase, Patient


class PatientLookupForm(forms.Form):
    """The exact MRN of a patient of the user's institution: one patient or none, never a list."""

    patient_mrn = forms.CharField(label="Patient MRN", max_length=64)


class CaseForm(forms.Form):
    NEW_PATIENT_FIELDS = ("patient_name", "patient_birth_date", "patient_sex")
    CASE_FIELDS = ("accession", "specimen_site", "priority", "clinical_notes")

    patient_mrn = forms.CharField(label="Patient MRN", max_length=64)
    patient_name = forms.CharField(
        label="Patient name", max_length=200, required=False, help_text="Required for a new patient."
    )
    patient_birth_date = forms.DateField(
        label="Date of birth", required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    # Not required: after a lookup found the patient, the page does not ask for it again.
    patient_sex = forms.ChoiceField(
        label="Sex", choices=Patient.Sex.choices, initial=Patient.Sex.UNKNOWN, required=False
    )
    accession = forms.CharField(max_length=64)
    specimen_site = forms.CharField(max_length=120, help_text="e.g. sigmoid colon")
    priority = forms.ChoiceField(choices=BiopsyCase.Priority.choices, initial=BiopsyCase.Priority.ROUTINE)
    clinical_notes = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)

    def new_patient_fields(self):
        return [self[name] for name in self.NEW_PATIENT_FIELDS]

    def case_fields(self):
        return [self[name] for name in self.CASE_FIELDS]
